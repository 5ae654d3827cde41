"""Batched generation: deterministic, batch composition / order does not change outputs, EOS and budget handling."""
import json
import random

import pytest
import torch

from tunesmith.cli import main
from tunesmith.errors import UserError
from tunesmith.generate import generate


@pytest.fixture(scope="module")
def model_and_tok(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


def some_prompts(tok, n=7, seed=0):
    rng = random.Random(seed)
    words = "the cat sat on a red mat what is the color of sky please tell me".split()
    return [tok(" ".join(rng.choices(words, k=rng.randint(1, 12))))["input_ids"] for _ in range(n)]


def eos_first_model():
    """A tiny model whose logits are all zero: greedy picks id 0, which its tokenizer makes the EOS token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["</s>", "x", "<pad>", "<unk>", "y"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=5, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, eos_token_id=0,
                                         pad_token_id=2, tie_word_embeddings=False))
    with torch.no_grad():
        model.model.norm.weight.zero_()
    return model, tokenizer


def test_greedy_is_deterministic(model_and_tok):
    model, tok = model_and_tok
    prompts = some_prompts(tok)
    a = generate(model, tok, prompts, batch_size=3, max_new_tokens=8)
    b = generate(model, tok, prompts, batch_size=3, max_new_tokens=8)
    assert a == b and len(a) == len(prompts)
    assert all(r["new_tokens"] <= 8 and isinstance(r["output"], str) for r in a)


def test_batching_and_order_do_not_change_outputs(model_and_tok):
    model, tok = model_and_tok
    prompts = some_prompts(tok, n=9, seed=1)
    assert len({len(p) for p in prompts}) > 3  # real padding happens
    one_by_one = [generate(model, tok, [p], batch_size=1, max_new_tokens=10)[0] for p in prompts]
    batched = generate(model, tok, prompts, batch_size=4, max_new_tokens=10)
    assert [r["output_ids"] for r in batched] == [r["output_ids"] for r in one_by_one]
    perm = list(range(len(prompts)))
    random.Random(3).shuffle(perm)
    shuffled = generate(model, tok, [prompts[i] for i in perm], batch_size=5, max_new_tokens=10)
    assert [r["output_ids"] for r in shuffled] == [one_by_one[i]["output_ids"] for i in perm]
    # the outputs really depend on the prompt (so the comparison above could fail)
    assert len({tuple(r["output_ids"]) for r in one_by_one}) > 1


def test_eos_cut_min_new_tokens_and_truncation():
    model, tok = eos_first_model()
    prompts = [tok("x y x")["input_ids"], tok("y")["input_ids"]]
    out = generate(model, tok, prompts, max_new_tokens=6)
    assert [r["output_ids"] for r in out] == [[], []] and not any(r["truncated"] for r in out)
    out = generate(model, tok, prompts, max_new_tokens=6, min_new_tokens=3)  # EOS blocked -> id 1 ("x") x3
    assert [r["output_ids"] for r in out] == [[1, 1, 1], [1, 1, 1]]
    assert out[0]["output"] == "x x x" and out[0]["new_tokens"] == 4 and not out[0]["truncated"]
    out = generate(model, tok, prompts, max_new_tokens=2, min_new_tokens=5)
    assert all(r["truncated"] and r["output_ids"] == [1, 1] for r in out)


def test_sampling_is_seeded(model_and_tok):
    model, tok = model_and_tok
    prompts = some_prompts(tok, n=3)
    s1 = generate(model, tok, prompts, do_sample=True, temperature=1.5, seed=1, max_new_tokens=12)
    s2 = generate(model, tok, prompts, do_sample=True, temperature=1.5, seed=1, max_new_tokens=12)
    s3 = generate(model, tok, prompts, do_sample=True, temperature=1.5, seed=2, max_new_tokens=12)
    assert s1 == s2 and s1 != s3


def test_bad_arguments(model_and_tok):
    model, tok = model_and_tok
    with pytest.raises(UserError, match="prompt 1 is empty"):
        generate(model, tok, [[5], []])
    with pytest.raises(UserError, match="batch_size"):
        generate(model, tok, [[5]], batch_size=0)


def test_cli_writes_alpaca_eval_rows_matching_the_python_api(templated_model_dir, tmp_path, alpaca_file, capsys):
    from tunesmith.data.formats import to_examples
    from tunesmith.data.source import read_records
    from tunesmith.data.templates import get_template
    from tunesmith.data.tokenize import encode_prompt
    from tunesmith.models import load_model_and_tokenizer

    out = tmp_path / "gen.jsonl"
    assert main(["generate", "--model", templated_model_dir, "--prompts", alpaca_file, "--output", str(out),
                 "--max_new_tokens", "6", "--limit", "5", "--batch_size", "2", "--repetition_penalty", "1.2",
                 "--generator", "tiny"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    src = [json.loads(x) for x in open(alpaca_file)][:5]
    assert len(rows) == 5
    for r, s in zip(rows, src):
        assert r["instruction"] == s["instruction"] and r["reference"] == s["output"]
        assert r["generator"] == "tiny" and r["decoding"]["repetition_penalty"] == 1.2
        assert r["decoding"]["template"] == "alpaca" and isinstance(r["truncated"], bool)
        assert (r.get("input") or "") == s["input"]
    model, tok = load_model_and_tokenizer(templated_model_dir)
    exs = to_examples(read_records(alpaca_file)[:5])
    ids = [encode_prompt(tok, get_template("alpaca"), e.for_generation()) for e in exs]
    ref = generate(model, tok, ids, batch_size=1, max_new_tokens=6, repetition_penalty=1.2)
    assert [r["output"] for r in rows] == [x["output"] for x in ref]
    assert "wrote 5 generations" in capsys.readouterr().out
    # the length-control suffix changes the prompt but not the recorded instruction
    out2 = tmp_path / "gen2.jsonl"
    assert main(["generate", "--model", templated_model_dir, "--prompts", alpaca_file, "--output", str(out2),
                 "--max_new_tokens", "6", "--limit", "5", "--prompt_suffix", "Answer at length."]) == 0
    rows2 = [json.loads(x) for x in out2.read_text().splitlines()]
    assert [r["instruction"] for r in rows2] == [r["instruction"] for r in rows]
    assert rows2[0]["decoding"]["prompt_suffix"] == "Answer at length."
    from tunesmith.generate import GenerateConfig, prompt_rows

    cfg = GenerateConfig(model_name_or_path=templated_model_dir, prompts=alpaca_file, output="x", limit=2,
                         prompt_suffix="Answer at length.")
    ids, meta = prompt_rows(cfg, tok, get_template("alpaca"))
    text = tok.decode(ids[1])
    assert f"{src[1]['instruction']} Answer at length." in text and text.endswith("### Response:\n")
    assert meta[1]["instruction"] == src[1]["instruction"]


def test_cli_errors(templated_model_dir, tmp_path, capsys):
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "just text"}\n')
    assert main(["generate", "--model", templated_model_dir, "--prompts", str(text), "--output",
                 str(tmp_path / "o.jsonl")]) == 2
    assert "text.jsonl:1" in capsys.readouterr().err and not (tmp_path / "o.jsonl").exists()
    assert main(["generate", "--model", templated_model_dir, "--prompts", str(text), "--output",
                 str(tmp_path / "o.jsonl"), "--backend", "vllm"]) == 2
    assert "vllm package is not installed" in capsys.readouterr().err


def test_temperature_zero_is_greedy(model_and_tok):
    model, tok = model_and_tok
    prompts = some_prompts(tok, n=4)
    greedy = generate(model, tok, prompts, max_new_tokens=8)
    assert generate(model, tok, prompts, do_sample=True, temperature=0.0, seed=3, max_new_tokens=8) == greedy
    with pytest.raises(UserError, match="temperature' must be >= 0"):
        generate(model, tok, prompts, do_sample=True, temperature=-0.5)
    with pytest.raises(UserError, match=r"top_p' must be in \(0, 1\]"):
        generate(model, tok, prompts, do_sample=True, top_p=0)


def test_cli_temperature_zero_notes_and_records_greedy(templated_model_dir, tmp_path, alpaca_file, caplog):
    out = tmp_path / "gen.jsonl"
    base = ["generate", "--model", templated_model_dir, "--prompts", alpaca_file, "--max_new_tokens", "5",
            "--limit", "3"]
    assert main(base + ["--output", str(out), "--do_sample", "true", "--temperature", "0"]) == 0
    assert "temperature 0 means greedy decoding" in caplog.text
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows[0]["decoding"]["do_sample"] is False and rows[0]["decoding"]["temperature"] == 0
    assert main(base + ["--output", str(tmp_path / "greedy.jsonl")]) == 0
    greedy = [json.loads(x)["output"] for x in (tmp_path / "greedy.jsonl").read_text().splitlines()]
    assert [r["output"] for r in rows] == greedy


def test_cli_output_problems_are_one_line_before_any_work(templated_model_dir, tmp_path, alpaca_file, capsys):
    base = ["generate", "--model", templated_model_dir, "--prompts", alpaca_file, "--max_new_tokens", "2"]
    assert main(base + ["--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}: 'output' names a directory" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "plain").write_text("x")
    assert main(base + ["--output", str(tmp_path / "plain" / "gen.jsonl")]) == 2
    assert "plain is a file, not a directory" in capsys.readouterr().err
    for flag, value, message in (("--temperature", "-1", "temperature' must be >= 0"),
                                 ("--batch_size", "0", "batch_size must be at least 1"),
                                 ("--repetition_penalty", "0", "repetition_penalty' must be > 0")):
        assert main(base + ["--output", str(tmp_path / "g.jsonl"), flag, value]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "g.jsonl").exists()


def test_lone_surrogate_in_prompts_is_one_line(templated_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "fine", "output": "ok"}\n'
                   '{"instruction": "broken \\ud800 text", "output": "ok"}\n', encoding="utf-8")
    assert main(["generate", "--model", templated_model_dir, "--prompts", str(bad), "--output",
                 str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: field 'instruction': lone surrogate escape \\ud800" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o.jsonl").exists()
