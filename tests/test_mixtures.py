"""The one data entry (tunesmith.data.source): sources resolved once, lists and mappings of sources, mixtures,
template auto, per-source evaluation."""
import json

import numpy as np
import pytest
from conftest import alpaca_rows, sft_config, write_jsonl

from tunesmith.data import source as D
from tunesmith.data.mixture import plan
from tunesmith.data.source import SourceSpec, open_sources, parse_sources, template_for, tokenize_sources
from tunesmith.data.templates import get_template
from tunesmith.errors import UserError

ML = 256


def chat_rows(n=12):
    return [{"messages": [{"role": "user", "content": f"what is {i} plus one"},
                          {"role": "assistant", "content": f"it is {i + 1}"}]} for i in range(n)]


# --- the dataset value ----------------------------------------------------------------------------------------------

def test_a_string_a_comma_list_and_mappings_are_one_rule(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(4))
    assert parse_sources(a) == [SourceSpec(a)]
    assert [s.path for s in parse_sources("x.jsonl, y.jsonl")] == ["x.jsonl", "y.jsonl"]
    assert parse_sources(["x.jsonl,y.jsonl", {"path": "z.jsonl", "weight": 2, "num_samples": 5}]) == [
        SourceSpec("x.jsonl"), SourceSpec("y.jsonl"), SourceSpec("z.jsonl", weight=2.0, num_samples=5)]
    comma = tmp_path / "with,comma.jsonl"
    comma.write_text(json.dumps(alpaca_rows(1)[0]) + "\n")
    assert parse_sources(str(comma)) == [SourceSpec(str(comma))]  # an existing file is one source
    assert parse_sources(None) == [] and parse_sources([]) == []


@pytest.mark.parametrize("value,message", [
    ([{"path": "a.jsonl", "wieght": 2}], r"field 'dataset': unknown key 'wieght'"),
    ([{"split": "train"}, "b.jsonl"], r"field 'dataset\[0\]': 'path' is required"),
    ([{"path": "a.jsonl", "weight": -1}, "b.jsonl"], r"field 'dataset\[0\]'.weight: must be a number > 0"),
    ([{"path": "a.jsonl", "num_samples": 0}], r"num_samples: must be an integer >= 1"),
    ([{"path": "a.jsonl", "format": "xml"}], r"unknown field 'dataset'.format 'xml'"),
    ([3], r"a source is a path or a mapping"),
])
def test_bad_sources_are_one_line_errors(value, message):
    with pytest.raises(UserError, match=message):
        parse_sources(value)


def test_config_takes_a_list_and_saves_it(tmp_path, tiny_model_dir):
    from tunesmith.config import parse_cli, read_yaml, save_yaml
    from tunesmith.recipes.sft.config import SFTConfig
    from tunesmith.recipes.training import run_fingerprint

    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(f"model_name_or_path: {tiny_model_dir}\noutput_dir: {tmp_path / 'o'}\nmixture: interleave\n"
                        "dataset:\n  - a.jsonl\n  - {path: b.jsonl, weight: 3, num_samples: 10}\n")
    cfg = parse_cli(SFTConfig, ["--config", str(cfg_file)], "sft", "")
    assert cfg.data.dataset == ["a.jsonl", {"path": "b.jsonl", "weight": 3, "num_samples": 10}]
    save_yaml(cfg, tmp_path / "saved.yaml")
    again = parse_cli(SFTConfig, ["--config", str(tmp_path / "saved.yaml")], "sft", "")
    assert again.data.dataset == cfg.data.dataset and read_yaml(tmp_path / "saved.yaml")["mixture"] == "interleave"
    # the run's fingerprint covers the mixture spec
    other = parse_cli(SFTConfig, ["--config", str(cfg_file), "--dataset", "[a.jsonl, {path: b.jsonl, weight: 1}]"],
                      "sft", "")
    assert run_fingerprint(other).digest != run_fingerprint(cfg).digest
    assert run_fingerprint(parse_cli(SFTConfig, ["--config", str(cfg_file), "--mixture", "concat", "--dataset",
                                                 "a.jsonl,b.jsonl"], "sft", "")).digest != run_fingerprint(cfg).digest
    with pytest.raises(UserError, match="'weight' needs mixture: interleave"):
        parse_cli(SFTConfig, ["--config", str(cfg_file), "--mixture", "concat"], "sft", "")
    with pytest.raises(UserError, match="field 'mixture': must be one of concat, interleave"):
        parse_cli(SFTConfig, ["--config", str(cfg_file), "--mixture", "shuffle"], "sft", "")


# --- the mixture plan -----------------------------------------------------------------------------------------------

def test_concat_and_num_samples():
    src, row = plan([3, 2], [SourceSpec("a"), SourceSpec("b")], "concat")
    assert src.tolist() == [0, 0, 0, 1, 1] and row.tolist() == [0, 1, 2, 0, 1]
    specs = [SourceSpec("a", num_samples=4), SourceSpec("b", num_samples=5)]
    src, row = plan([10, 2], specs, "concat", seed=3)
    first, second = row[src == 0], row[src == 1]
    assert len(first) == 4 and len(set(first.tolist())) == 4  # a subset, without replacement
    assert second.tolist()[:4] == [0, 1, 0, 1] and np.bincount(second).tolist() in ([3, 2], [2, 3])  # 2 copies + 1
    again = plan([10, 2], specs, "concat", seed=3)
    assert again[1].tolist() == row.tolist()  # deterministic under the seed
    assert {tuple(plan([10, 2], specs, "concat", seed=s)[1][:4].tolist()) for s in range(6)} != {tuple(first)}
    # adding a source leaves the others' subsets alone
    more = plan([10, 2, 7], specs + [SourceSpec("c", num_samples=3)], "concat", seed=3)
    assert more[1][:9].tolist() == row.tolist()


def test_interleave_follows_the_weights_and_stops_at_the_first_exhausted_source():
    specs = [SourceSpec("a", weight=3), SourceSpec("b", weight=1)]
    src, row = plan([30_000, 30_000], specs, "interleave", seed=0)
    share = (src == 0).mean()
    assert abs(share - 0.75) < 0.01
    assert (src == 0).sum() <= 30_000 and ((src == 0).sum() == 30_000 or (src == 1).sum() == 30_000)
    for k in (0, 1):  # no example twice, each source read in order
        assert row[src == k].tolist() == list(range((src == k).sum()))
    assert plan([30_000, 30_000], specs, "interleave", seed=0)[0].tolist() == src.tolist()
    assert plan([30_000, 30_000], specs, "interleave", seed=1)[0].tolist() != src.tolist()
    # the draw agrees with datasets.interleave_datasets' first_exhausted rule on the same sizes: a source runs out
    small = plan([100, 1000], [SourceSpec("a"), SourceSpec("b")], "interleave", seed=5)[0]
    assert (small == 0).sum() == 100 and 150 < len(small) < 260


# --- sources through the entry --------------------------------------------------------------------------------------

def test_two_sources_are_cached_each_and_mixed(tiny_tokenizer, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(10, seed=1))
    b = write_jsonl(tmp_path / "b.jsonl", alpaca_rows(6, seed=2))
    cache, t = tmp_path / "cache", get_template("alpaca")
    sources = open_sources(f"{a},{b}")
    rows, summary = tokenize_sources(sources, tiny_tokenizer, t, ML, cache_dir=cache)
    one, _ = open_sources(a)[0].tokenized(tiny_tokenizer, t, ML, cache_dir=cache)
    two, _ = open_sources(b)[0].tokenized(tiny_tokenizer, t, ML, cache_dir=cache)
    assert list(rows) == list(one) + list(two) and rows.lengths.tolist() == one.lengths.tolist() + two.lengths.tolist()
    assert rows[[12, 0]] == [two[2], one[0]] and rows[-1] == two[-1]
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2  # one entry per source
    assert summary.counts == [10, 6] and summary.kept == 16
    assert summary.lines()[-1] == "mixture (concat, seed 0): 16 examples: a 10 (62.5%), b 6 (37.5%)"
    assert any(line.startswith(f"data {a}: 10 examples") for line in summary.lines())
    mixed, s2 = tokenize_sources(open_sources([a, {"path": b, "num_samples": 12}]), tiny_tokenizer, t, ML,
                                 cache_dir=cache)
    assert s2.counts == [10, 12] and len(mixed) == 22
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2  # the same two entries, reused


def test_a_hub_source_is_loaded_once(tiny_tokenizer, tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_hub(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(alpaca_rows(8))

    monkeypatch.setattr(D, "load_hub", fake_hub)
    [source] = open_sources("someone/alpaca-like")
    rows, summary = tokenize_sources([source], tiny_tokenizer, get_template("alpaca"), ML, cache_dir=tmp_path)
    assert len(rows) == 8 and calls == [("someone/alpaca-like", "train")]
    assert summary.parts[0].dropped == [] and source.first_record.loc == "someone/alpaca-like[train]: row 0"


# --- template auto --------------------------------------------------------------------------------------------------

def test_template_auto_picks_chat_for_chat_data_when_the_tokenizer_has_one(tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    chat = open_sources(write_jsonl(tmp_path / "c.jsonl", chat_rows()))
    alpaca = open_sources(write_jsonl(tmp_path / "a.jsonl", alpaca_rows(4)))
    share = open_sources(write_jsonl(tmp_path / "s.jsonl", [{"conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "yes"}]}]))
    assert template_for("auto", tiny_tokenizer, chat).spec() == "chat"
    assert template_for("auto", tiny_tokenizer, share).spec() == "chat"
    assert template_for("auto", tiny_tokenizer, alpaca).spec() == "alpaca"
    assert template_for("auto", tiny_tokenizer, alpaca + chat).spec() == "chat"
    assert template_for("qa", tiny_tokenizer, chat).spec() == "qa"
    bare = AutoTokenizer.from_pretrained(tiny_tokenizer.name_or_path)
    bare.chat_template = None
    assert template_for("auto", bare, chat).spec() == "alpaca"


def test_sft_with_chat_data_saves_the_chat_template_and_evaluates_each_source(tiny_model_dir, tmp_path):
    from tunesmith.recipes import sft

    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(16))
    held = [write_jsonl(tmp_path / "held.jsonl", chat_rows(4)), write_jsonl(tmp_path / "far.jsonl", chat_rows(3))]
    cfg = sft_config(tiny_model_dir, data, tmp_path / "run", max_steps=2, eval_dataset=held, eval_strategy="steps",
                     eval_steps=2, train_loss_eval_samples=4)
    del cfg["template"]  # the default: auto
    out = sft.train(cfg)
    assert json.loads((tmp_path / "run" / "tunesmith_template.json").read_text())["template"] == "chat"
    assert "prompt template: `chat`" in (tmp_path / "run" / "README.md").read_text()
    logged = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    keys = {k for row in logged for k in row}
    assert {"eval_held_loss", "eval_far_loss", "eval_train_loss"} <= keys and "eval_eval_loss" not in keys


def test_an_interleaved_mixture_packs_and_batches_like_its_list(tiny_tokenizer, tmp_path):
    from tunesmith.data.collate import Collator, pack

    a = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(30, seed=1))
    b = write_jsonl(tmp_path / "b.jsonl", chat_rows(30))
    sources = open_sources([{"path": a, "weight": 1}, {"path": b, "weight": 2, "template": "chat"}])
    rows, summary = tokenize_sources(sources, tiny_tokenizer, get_template("alpaca"), ML, mixture="interleave",
                                     seed=1, cache_dir=tmp_path / "c")
    listed = list(rows)
    assert summary.counts[1] == 30 and 0 < summary.counts[0] < 30  # the chat source ran out first
    assert "<|im_start|>" in tiny_tokenizer.decode(rows[int(np.flatnonzero(summary.src == 1)[0])]["input_ids"])
    assert list(pack(rows, 512)) == list(pack(listed, 512))
    batch = Collator(0)(rows[0:4])
    assert batch["input_ids"].shape[0] == 4


def test_mapped_caches_a_recipes_own_table_over_examples_or_records(tmp_path, monkeypatch):
    import pyarrow as pa
    from datasets import Features, Value

    from tunesmith.data import prepare
    from tunesmith.data.prepare import row_examples
    from tunesmith.data.source import open_source

    rows = alpaca_rows(5)
    source = open_source(write_jsonl(tmp_path / "a.jsonl", rows))

    def prompts(batch):
        return {"prompt": [ex.turns[0].prompt for ex in row_examples(batch)]}

    features = Features({"loc": Value("string"), "prompt": Value("string")})
    table, manifest = source.mapped(prompts, key={"stage": "prompts"}, features=features, cache_dir=tmp_path / "c")
    assert table["prompt"] == [r["instruction"] for r in rows] and table.column_names == ["loc", "prompt"]
    assert manifest["examples"] == 5 and table["loc"][1].endswith("a.jsonl:2")
    with monkeypatch.context() as m:
        m.setattr(prepare, "_build_entry", lambda *a, **k: (_ for _ in ()).throw(AssertionError("rebuilt")))
        again, _ = source.mapped(prompts, key={"stage": "prompts"}, features=features, cache_dir=tmp_path / "c")
    assert again["prompt"] == table["prompt"]

    schema = pa.schema([("loc", pa.string()), ("chosen", pa.string())])  # records that are not examples

    def to_row(record):
        return {"loc": record.loc, "chosen": record.data["output"]}

    def upper(batch):
        return {"chosen": [c.upper() for c in batch["chosen"]]}

    pairs, _ = source.mapped(upper, key={"stage": "pairs"}, normalise=(to_row, schema), cache_dir=tmp_path / "c",
                             features=Features({"loc": Value("string"), "chosen": Value("string")}))
    assert pairs["chosen"] == [r["output"].upper() for r in rows]
    assert len([p for p in (tmp_path / "c").iterdir() if not p.name.startswith(".")]) == 2


def test_records_and_examples_of_a_list_follow_the_same_plan(tmp_path):
    from tunesmith.data.source import read_examples, read_records
    from tunesmith.recipes.classify.config import ClassifyConfig

    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"good {i}", "label": "pos"} for i in range(4)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"bad {i}", "label": "neg"} for i in range(3)])
    records = read_records([a, {"path": b, "num_samples": 5}], seed=2)
    assert [r.data["text"] for r in records[:4]] == [f"good {i}" for i in range(4)] and len(records) == 9
    assert sorted(r.data["text"] for r in records[4:])[:2] == ["bad 0", "bad 0"]  # one copy of b, and 2 more
    assert read_records([a, {"path": b, "num_samples": 5}], seed=2) == records
    cfg = ClassifyConfig(model_name_or_path="m", dataset=f"{a},{b}", output_dir=str(tmp_path / "o"))
    assert len(read_records(cfg.data.dataset)) == 7
    examples = read_examples(f"{a},{b}", dataset_format="text", limit=5)
    assert [e.text for e in examples] == [f"good {i}" for i in range(4)] + ["bad 0"]
