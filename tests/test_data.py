"""Formats, templates and masking, checked token by token."""
import json

import pytest

from conftest import write_jsonl
from tunesmith.data.collate import Collator, pack
from tunesmith.data.formats import Example, Turn, to_examples
from tunesmith.data.load import Record
from tunesmith.data.source import read_records
from tunesmith.data.prepare import tokenize_examples
from tunesmith.data.templates import get_template
from tunesmith.data.tokenize import IGNORE, encode, encode_prompt
from tunesmith.errors import UserError
from tunesmith.models import PAD_TOKEN, ensure_pad_token


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


def test_pad_token_is_dedicated(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.pad_token is None
    assert ensure_pad_token(tok)
    assert tok.pad_token == PAD_TOKEN and tok.pad_token_id != tok.eos_token_id


def test_collator_and_pack_layout():
    a = {"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}
    b = {"input_ids": [8, 9], "labels": [8, 9]}
    rows = pack([a, b], max_length=8)
    assert len(rows) == 1
    assert rows[0]["position_ids"] == [0, 1, 2, 0, 1]
    assert rows[0]["labels"] == [IGNORE, 6, 7, IGNORE, 9]  # no example is trained to follow the previous one
    batch = Collator(pad_token_id=3)(rows + [{"input_ids": [1], "labels": [1], "position_ids": [0]}])
    assert batch["input_ids"][1].tolist() == [1, 3, 3, 3, 3]
    assert batch["position_ids"][1].tolist() == [0, 0, 1, 2, 3]
    assert batch["token_mask"][1].tolist() == [1, 0, 0, 0, 0]
    assert "attention_mask" not in batch


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
