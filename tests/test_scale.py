"""Data at scale: the Arrow data path (same examples, summary and errors as the in-memory path; cached; shared by the
processes of a distributed run) and packed rows read lazily from it. The O(n log n) packing itself:
tests/test_collate.py; lean logits (no batch x sequence x vocabulary tensor): tests/test_scoring.py."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import alpaca_rows, free_port, write_jsonl

from tunesmith.data.collate import Collator, concat, pack
from tunesmith.data.prepare import tokenize_examples
from tunesmith.data.source import open_source, read_examples
from tunesmith.data.templates import get_template
from tunesmith.errors import UserError

HERE = Path(__file__).parent
ML = 256  # max_length


def prepared(data, tokenizer, template, max_length, cache_dir, **options):
    """Token rows of one source through the data entry."""
    return open_source(data, cache_dir=cache_dir).tokenized(tokenizer, template, max_length, cache_dir=cache_dir,
                                                            **options)


# --- the Arrow data path --------------------------------------------------------------------------------------------

def mixed_rows(n=40):
    rows = alpaca_rows(n)
    rows[3]["output"] = ""  # nothing to train after the prompt... except the EOS, which is trained
    rows[5]["instruction"] = " ".join(["what"] * 300)  # the prompt alone fills max_length: dropped
    rows[7]["output"] = " ".join(["red"] * 200)  # truncated
    return rows


def test_arrow_path_gives_the_in_memory_examples_and_summary(tiny_tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", mixed_rows())
    template = get_template("alpaca")
    expected, expected_summary = tokenize_examples(read_examples(data), tiny_tokenizer, template, ML, source=data)
    got, summary = prepared(data, tiny_tokenizer, template, ML, cache_dir=tmp_path / "cache")
    assert summary == expected_summary
    assert summary.dropped == [f"{data}:6"] and summary.truncated >= 1 and summary.kept == 39
    assert len(got) == len(expected) == 39
    assert list(got) == expected
    assert got[0] == expected[0] and got[-1] == expected[-1] and got[5:9] == expected[5:9]
    assert got[[3, 1]] == [expected[3], expected[1]]
    assert got.lengths.tolist() == [len(e["input_ids"]) for e in expected]
    with pytest.raises(IndexError):
        got[39]


def test_second_run_maps_the_cache_and_inputs_change_the_fingerprint(tiny_tokenizer, tmp_path, monkeypatch):
    from tunesmith.data import prepare

    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(20))
    template, cache = get_template("alpaca"), tmp_path / "cache"
    first, _ = prepared(data, tiny_tokenizer, template, ML, cache_dir=cache)
    entries = [p for p in cache.iterdir()]
    assert len(entries) == 1 and (entries[0] / "manifest.json").exists()

    def no_build(*a, **k):
        raise AssertionError("rebuilt although cached")

    with monkeypatch.context() as m:
        m.setattr(prepare, "_build_entry", no_build)
        again, summary = prepared(data, tiny_tokenizer, template, ML, cache_dir=cache)
    assert list(again) == list(first) and summary.kept == 20
    prepared(data, tiny_tokenizer, template, 200, cache_dir=cache)  # another max_length
    prepared(data, tiny_tokenizer, template, ML, train_on_prompt=True, cache_dir=cache)
    prepared(data, tiny_tokenizer, get_template("qa"), ML, cache_dir=cache)
    write_jsonl(data, alpaca_rows(20, seed=2))  # same path, other content
    changed, _ = prepared(data, tiny_tokenizer, template, ML, cache_dir=cache)
    assert list(changed) != list(first)
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 5
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no build left behind


def test_tokenizing_in_two_processes_gives_the_same_data(tiny_tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", mixed_rows(60))
    template = get_template("alpaca")
    one, s1 = prepared(data, tiny_tokenizer, template, ML, cache_dir=tmp_path / "a")
    two, s2 = prepared(data, tiny_tokenizer, template, ML, num_proc=2, cache_dir=tmp_path / "b")
    assert s1 == s2 and list(one) == list(two)
    [entry] = (tmp_path / "b").iterdir()
    assert len(json.loads((entry / "manifest.json").read_text())["files"]) == 2


@pytest.mark.parametrize("content,expected", [
    (b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', r"d\.jsonl:2: malformed JSON"),
    (b'{"instruction": "a", "output": "b"}\n{"output": "b", "instruction": 3}\n',
     r"d\.jsonl:2: field 'instruction' must be a string"),
    (b'{"instruction": "a", "output": "b"}\n' * 1500 + b'{"instruction": "a"}\n',
     r"d\.jsonl:1501: field 'output' is missing"),
    (b'{"instruction": "a", "output": "b\xff"}\n', r"d\.jsonl:1: not valid UTF-8"),
    (b"", r"d\.jsonl: the dataset is empty"),
    (b'{"foo": 1}\n', r"d\.jsonl:1: cannot detect the data format"),
])
def test_bad_data_stops_with_its_line_and_caches_nothing(tiny_tokenizer, tmp_path, content, expected):
    p = tmp_path / "d.jsonl"
    p.write_bytes(content)
    with pytest.raises(UserError, match=expected):
        prepared(str(p), tiny_tokenizer, get_template("alpaca"), ML, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())


def test_nothing_trainable_is_an_error(tiny_tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a b c d e f", "output": "x"}] * 3)
    with pytest.raises(UserError, match="no example has a trainable token left"):
        prepared(data, tiny_tokenizer, get_template("alpaca"), 8, cache_dir=tmp_path / "cache")


def test_processes_of_a_distributed_run_share_one_build(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(30))
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, sys
        import torch.distributed as dist
        from transformers import AutoTokenizer
        from tunesmith.data import prepare
        from tunesmith.data.source import open_source
        from tunesmith.data.templates import get_template

        dist.init_process_group("gloo")
        builds = []
        real = prepare._build_entry
        prepare._build_entry = lambda *a, **k: (builds.append(1), real(*a, **k))
        tok = AutoTokenizer.from_pretrained({tiny_model_dir!r})
        data, summary = open_source({data!r}).tokenized(tok, get_template("alpaca"), {ML},
                                                        cache_dir={str(tmp_path / "c")!r})
        out = {{"builds": len(builds), "rows": [r["input_ids"] for r in data], "kept": summary.kept}}
        with open(os.path.join({str(tmp_path)!r}, f"rank{{dist.get_rank()}}.json"), "w") as f:
            json.dump(out, f)
        dist.barrier()
        dist.destroy_process_group()
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), str(HERE)]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["builds"] + r1["builds"] == 1  # one process tokenized, the other mapped its result
    assert r0["rows"] == r1["rows"] and r0["kept"] == 30


# --- packing --------------------------------------------------------------------------------------------------------


def test_packed_rows_read_lazily_from_arrow_equal_packed_lists(tiny_tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", mixed_rows(50))
    template = get_template("alpaca")
    arrow, _ = prepared(data, tiny_tokenizer, template, ML, cache_dir=tmp_path / "c")
    listed, _ = tokenize_examples(read_examples(data), tiny_tokenizer, template, ML)
    a, b = pack(arrow, 512), pack(listed, 512)
    assert len(a) == len(b) < len(listed) and list(a) == list(b)
    assert 0.5 < a.fill == b.fill <= 1
    assert sum(len(r["input_ids"]) for r in a) == sum(len(e["input_ids"]) for e in listed)
    assert all(len(r["input_ids"]) <= 512 for r in a)
    first = a[0]
    assert first == concat([listed[i] for i in a.members[a.offsets[0]:a.offsets[1]]])
    batch = Collator(0)(a[0:3])
    assert batch["input_ids"].shape[0] == 3 and "position_ids" in batch
