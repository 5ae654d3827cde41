"""Formats, templates and masking, checked token by token."""
import json

import pytest

from conftest import write_jsonl
from tunesmith.data.formats import Example, Turn, to_examples
from tunesmith.data.load import Record
from tunesmith.data.source import read_records
from tunesmith.data.prepare import tokenize_examples
from tunesmith.data.templates import get_template
from tunesmith.data.tokenize import IGNORE, encode, encode_prompt
from tunesmith.errors import UserError


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def trained(enc):
    return [t for t, l in zip(enc["input_ids"], enc["labels"]) if l != IGNORE]


def check(tok, template_name, example, pieces):
    """``pieces``: [(text, trained)] expected; EOS follows each trained piece for plain templates."""
    template = get_template(template_name, tok)
    enc = encode(tok, template, example, max_length=10_000)
    exp_ids, exp_labels = [], []
    for text, is_trained in pieces:
        t = ids(tok, text) + ([tok.eos_token_id] if is_trained and template.appends_eos else [])
        exp_ids += t
        exp_labels += t if is_trained else [IGNORE] * len(t)
    assert enc["input_ids"] == exp_ids
    assert enc["labels"] == exp_labels
    return enc


def test_alpaca_template_with_and_without_input(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = to_examples([Record({"instruction": "name a color", "input": "", "output": "red"}, "f:1")])[0]
    check(tok, "alpaca", ex, [(
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nname a color\n\n### Response:\n", False), ("red", True)])
    ex = to_examples([Record({"instruction": "name it", "input": "the sky", "output": "blue"}, "f:1")])[0]
    check(tok, "alpaca", ex, [(
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nname it\n\n### Input:\n"
        "the sky\n\n### Response:\n", False), ("blue", True)])


def test_instruction_response_and_qa_templates(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = Example(turns=[Turn("what is the sky", "blue")])
    check(tok, "instruction_response", ex, [("### Instruction: what is the sky\n\n### Response:", False),
                                            (" blue", True)])
    check(tok, "qa", ex, [("Please answer the following question. Q: what is the sky A:", False), (" blue", True)])
    rendered = "".join(t for t, _ in get_template("qa").segments(ex))
    assert rendered == "Please answer the following question. Q: what is the sky A: blue"


def test_prompt_completion_and_text_formats(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = to_examples([Record({"prompt": "one two", "completion": "three"}, "f:1")])[0]
    check(tok, "instruction_response", ex, [("### Instruction: one two\n\n### Response:", False), (" three", True)])
    ex = to_examples([Record({"text": "the cat sat"}, "f:1")])[0]
    enc = encode(tok, get_template("alpaca"), ex, 100)
    assert enc["input_ids"] == ids(tok, "the cat sat") + [tok.eos_token_id]
    assert enc["labels"] == enc["input_ids"]  # plain text: every token trained


@pytest.mark.parametrize("fmt,record", [
    ("messages", {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                               {"role": "assistant", "content": "yes"}, {"role": "user", "content": "more"},
                               {"role": "assistant", "content": "no"}]}),
    ("sharegpt", {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"},
                                    {"from": "gpt", "value": "yes"}, {"from": "human", "value": "more"},
                                    {"from": "gpt", "value": "no"}]}),
])
def test_chat_formats_train_every_assistant_turn(tiny_tokenizer, fmt, record):
    tok = tiny_tokenizer
    [ex] = to_examples([Record(record, "f:1")])
    enc = check(tok, "chat", ex, [
        ("<|im_start|>system\nbe brief<|im_end|><|im_start|>user\nhi<|im_end|><|im_start|>assistant\n", False),
        ("yes</s>", True),
        ("<|im_start|>user\nmore<|im_end|><|im_start|>assistant\n", False),
        ("no</s>", True)])
    assert trained(enc).count(tok.eos_token_id) == 2  # EOS ends and is trained in every assistant turn


def test_multi_turn_plain_template_trains_all_responses(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = Example(turns=[Turn("a", "b"), Turn("c", "d")])
    check(tok, "qa", ex, [("Please answer the following question. Q: a A:", False), (" b", True),
                          ("Please answer the following question. Q: c A:", False), (" d", True)])


def test_generation_prompt_is_training_prefix(tiny_tokenizer):
    tok = tiny_tokenizer
    for name in ("alpaca", "instruction_response", "qa", "chat"):
        ex = Example(turns=[Turn("what is one", "two"), Turn("and three", "four")], system="sys")
        t = get_template(name, tok)
        full = encode(tok, t, ex, 10_000)["input_ids"]
        prompt = encode_prompt(tok, t, ex)
        first_trained_of_last = max(i for i, l in enumerate(encode(tok, t, ex, 10_000)["labels"])
                                    if l == IGNORE) + 1
        assert full[:len(prompt)] == prompt and len(prompt) == first_trained_of_last, name


def test_truncation_keeps_prompt_start_and_drops_untrainable(tiny_tokenizer):
    tok = tiny_tokenizer
    t = get_template("qa")
    long = Example(turns=[Turn("a b c", "red blue green red blue green")], loc="f:1")
    full = encode(tok, t, long, 10_000)
    cut = encode(tok, t, long, len(full["input_ids"]) - 2)
    assert cut["input_ids"] == full["input_ids"][:-2]
    short = Example(turns=[Turn("x", "y")], loc="f:2")
    limit = len(encode(tok, t, short, 10_000)["input_ids"])
    wordy = Example(turns=[Turn("a b c d e f g h i j k", "red")], loc="f:1")  # its prompt alone exceeds the limit
    enc, summary = tokenize_examples([wordy, short], tok, t, max_length=limit, source="f")
    assert summary.dropped == ["f:1"] and summary.kept == 1 and len(enc) == 1
    assert summary.eos_trained == 1 and trained(enc[0])[-1] == tok.eos_token_id
    with pytest.raises(UserError, match="no example has a trainable token"):
        tokenize_examples([wordy], tok, t, max_length=limit, source="f")


def test_loaders_agree_across_file_types(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("instruction,output\na,b\nc,d\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for suffix in ("jsonl", "json", "csv", "parquet"):
        recs = read_records(tmp_path / f"d.{suffix}")
        assert [r.data for r in recs] == rows, suffix
    assert read_records(tmp_path / "d.csv")[1].loc.endswith("d.csv:3")
    assert read_records(tmp_path / "d.jsonl")[1].loc.endswith("d.jsonl:2")


@pytest.mark.parametrize("content,expected", [
    (b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', r"d\.jsonl:2: malformed JSON"),
    (b'{"instruction": "a", "output": "b"}\n{"output": "b", "instruction": 3}\n',
     r"d\.jsonl:2: field 'instruction' must be a string"),
    (b'{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', r"d\.jsonl:2: field 'output' is missing"),
    (b'{"instruction": "a", "output": "b\xff"}\n', r"d\.jsonl:1: not valid UTF-8"),
    (b"", r"d\.jsonl: the dataset is empty"),
    (b'{"foo": 1}\n', r"d\.jsonl:1: cannot detect the data format"),
    (b'{"messages": [{"role": "bot", "content": "x"}]}\n', r"d\.jsonl:1: field 'messages\[0\]\.role'"),
])
def test_bad_data_names_file_line_and_field(tmp_path, content, expected):
    p = tmp_path / "d.jsonl"
    p.write_bytes(content)
    with pytest.raises(UserError, match=expected):
        to_examples(read_records(p))


def test_bad_template_and_format_names():
    with pytest.raises(UserError, match="unknown template 'nope'"):
        get_template("nope")
    with pytest.raises(UserError, match="response marker"):
        get_template("Q: {prompt} A:")
    with pytest.raises(UserError, match="unknown dataset_format 'xml'"):
        to_examples([Record({"a": 1}, "f:1")], "xml")


# --- input that must load, or fail in one line (issue 18.6 / 18.8, issue 23.5) ---------------------------------------

def deep(n=5000):
    return "[" * n + "]" * n


@pytest.mark.parametrize("name,content,message", [
    ("d.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": ' + deep() + ', "output": "b"}\n',
     r"d\.jsonl:2: JSON nested too deeply"),
    ("d.json", '[{"instruction": "a", "output": ' + deep() + "}]", r"d\.json: JSON nested too deeply"),
])
def test_json_nested_5000_deep_is_a_one_line_error(tmp_path, name, content, message):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(UserError, match=message):
        read_records(p)


def test_deep_json_through_the_command_line_is_one_line(templated_model_dir, tmp_path, capsys):
    from tunesmith.cli import main
    from tunesmith.evaluation.genfile import read_generations

    p = tmp_path / "p.jsonl"
    p.write_text('{"instruction": ' + deep() + ', "output": "b"}\n')
    assert main(["generate", "--model", templated_model_dir, "--prompts", str(p), "--output",
                 str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"tunesmith generate: error: {p}:1: JSON nested too deeply (more than about " \
                          f"{__import__('sys').getrecursionlimit()} levels)"
    with pytest.raises(UserError, match=r"p\.jsonl:1: JSON nested too deeply"):
        read_generations(p)


def test_a_csv_field_over_131072_characters_loads(tmp_path):
    import csv

    long = "word " * 60_000  # 300,000 characters
    p = tmp_path / "d.csv"
    p.write_text(f'instruction,output\nsummarize,"{long}"\nshort,ok\n')
    records = read_records(p)
    assert records[0].data["output"] == long and records[1].loc.endswith("d.csv:3")
    assert csv.field_size_limit() == 131072  # the csv module's setting is restored for other code


@pytest.mark.parametrize("content", [
    "\n".join(json.dumps(r) for r in [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]),
    json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]),
    "instruction,output\na,b\nc,d\n",
])
def test_a_pipe_is_a_dataset(tmp_path, content):
    import os
    import threading

    from tunesmith.data.source import open_source

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)

    def write():
        with open(fifo, "w") as f:
            f.write(content)

    writer = threading.Thread(target=write)
    writer.start()
    source = open_source(str(fifo))  # read once (spooled), then records, format and fingerprint as for a file
    writer.join()
    assert [r.data for r in source.records()] == [{"instruction": "a", "output": "b"}, {"instruction": "c",
                                                                                        "output": "d"}]
    assert source.format == "alpaca" and str(fifo) in source.first_record.loc and source.fingerprint
    spooled = source.path
    del source
    import gc

    gc.collect()
    assert not spooled.exists()  # the spooled copy goes with the source


def test_process_substitution_on_the_command_line(tiny_model_dir, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    data = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "what is red", "output": "a color"}] * 3)
    src = Path(__file__).resolve().parent.parent / "src"
    cmd = (f"{sys.executable} -m tunesmith.cli audit --model_name_or_path {tiny_model_dir} --output_dir "
           f"{tmp_path / 'o'} --template alpaca --show 1 --dataset <(cat {data})")
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(src)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "3 examples, 3 kept" in proc.stdout and "a color" in proc.stdout


@pytest.fixture
def shipped_package(tmp_path, monkeypatch, templated_model_dir):
    """An installed package (on sys.path) shipping a model directory and a data file: pkg:shipped_data/..."""
    import importlib
    import shutil

    pkg = tmp_path / "site" / "shipped_data"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    shutil.copytree(templated_model_dir, pkg / "model")
    write_jsonl(pkg / "data" / "train.jsonl", [{"instruction": f"say {w}", "output": w} for w in ("red", "blue")])
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    return pkg


def test_pkg_paths_work_in_every_command(shipped_package, tmp_path, capsys):
    from tunesmith.cli import main
    from tunesmith.config import build_config
    from tunesmith.models import ensure_pad_token, load_tokenizer
    from tunesmith.recipes.sft import SFTConfig, prepare_data

    cfg = build_config(SFTConfig, {"model_name_or_path": "pkg:shipped_data/model", "output_dir": str(tmp_path / "o"),
                                   "dataset": "pkg:shipped_data/data/train.jsonl", "template": "alpaca"})
    assert cfg.model.model_name_or_path == str(shipped_package / "model")
    tok = load_tokenizer(cfg.model.model_name_or_path)
    ensure_pad_token(tok)
    _, rows, summary, _, _ = prepare_data(cfg, tok)
    assert len(rows) == 2 and summary.parts[0].source == str(shipped_package / "data" / "train.jsonl")
    out = tmp_path / "g.jsonl"
    assert main(["generate", "--model", "pkg:shipped_data/model", "--prompts", "pkg:shipped_data/data/train.jsonl",
                 "--output", str(out), "--max_new_tokens", "2"]) == 0
    assert [json.loads(x)["reference"] for x in out.read_text().splitlines()] == ["red", "blue"]
    assert main(["eval", "--model", "pkg:shipped_data/model", "--dataset", "pkg:shipped_data/data/train.jsonl",
                 "--output", str(tmp_path / "e.json")]) == 0
    loss = json.loads((tmp_path / "e.json").read_text())["loss"]
    assert loss["pkg:shipped_data/data/train.jsonl"]["examples"] == 2
    assert main(["generate", "--model", "pkg:shipped_data/model", "--prompts", "pkg:shipped_data/nothing.jsonl",
                 "--output", str(tmp_path / "x.jsonl")]) == 2
    assert "'nothing.jsonl' does not exist inside package 'shipped_data'" in capsys.readouterr().err


def test_a_comma_list_is_a_list_in_sft_as_in_eval(tiny_model_dir, templated_model_dir, tmp_path):
    from tunesmith.cli import main
    from tunesmith.config import parse_cli
    from tunesmith.models import ensure_pad_token, load_tokenizer
    from tunesmith.recipes.sft import SFTConfig, prepare_data

    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "output": "y"}] * 3)
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": "u", "output": "v"}] * 2)
    cfg = parse_cli(SFTConfig, ["--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "o"),
                                "--dataset", f"{a},{b}"], "sft", "")
    tok = load_tokenizer(tiny_model_dir)
    ensure_pad_token(tok)
    _, rows, summary, _, _ = prepare_data(cfg, tok)
    assert len(rows) == 5 and summary.counts == [3, 2]
    assert main(["eval", "--model", templated_model_dir, "--dataset", f"{a},{b}", "--output",
                 str(tmp_path / "e.json")]) == 0
    assert set(json.loads((tmp_path / "e.json").read_text())["loss"]) == {a, b}
