"""`tunesmith generate --backend vllm` against a stand-in `vllm` module that records what it is given (vLLM needs a
GPU; this checks the contract: the HF path's prompt ids token for token, one seeded SamplingParams per request, the
same stop ids, outputs decoded and ordered like the HF path's)."""
import json
import sys
import types

import pytest
import torch

from tunesmith.cli import main

EOS = 1  # the test tokenizer's </s>


class FakeVLLM:
    """The slice of vLLM's API tunesmith uses (LLM, SamplingParams, LLM.generate with TokensPrompt dicts), recording
    every call. Request i answers with the last two prompt tokens and then EOS (i even) or runs out of budget."""

    def __init__(self):
        self.llm_kwargs, self.prompts, self.params = None, None, None
        fake = self

        class SamplingParams:
            def __init__(self, **kwargs):
                self.kwargs = kwargs

        class LLM:
            def __init__(self, **kwargs):
                fake.llm_kwargs = kwargs

            def generate(self, prompts, sampling_params):
                fake.prompts, fake.params = prompts, sampling_params
                outs = []
                for i, p in enumerate(prompts):
                    budget = sampling_params[i].kwargs["max_tokens"]
                    if i % 2 == 0:
                        ids, reason = p["prompt_token_ids"][-2:] + [EOS], "stop"
                    else:
                        ids, reason = (p["prompt_token_ids"] * budget)[:budget], "length"
                    outs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(
                        token_ids=ids, text="<vllm's own detokenization>", finish_reason=reason)]))
                return outs

        self.module = types.ModuleType("vllm")
        self.module.LLM, self.module.SamplingParams = LLM, SamplingParams


@pytest.fixture
def fake_vllm(monkeypatch):
    fake = FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    return fake


def hf_prompts_seen(argv, pad_id: int) -> list[list[int]]:
    """Run the HF backend through the CLI and record the prompt ids its prefill passes embed (left padding off)."""
    seen = []

    def record(module, args):
        ids = args[0] if args else None
        if isinstance(module, torch.nn.Embedding) and ids is not None and ids.dim() == 2 and ids.shape[1] > 1:
            for row in ids.tolist():
                while row and row[0] == pad_id:
                    row = row[1:]
                seen.append(row)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        assert main(argv) == 0
    finally:
        handle.remove()
    return seen


def test_vllm_gets_the_hf_prompt_ids_and_a_seed_per_request(templated_model_dir, alpaca_file, tmp_path, fake_vllm):
    base = ["generate", "--model", templated_model_dir, "--prompts", alpaca_file, "--limit", "7",
            "--max_new_tokens", "3", "--batch_size", "3", "--repetition_penalty", "1.2", "--min_new_tokens", "1",
            "--seed", "5"]
    hf_out, vllm_out = tmp_path / "hf.jsonl", tmp_path / "vllm.jsonl"
    from tunesmith.models import ensure_pad_token, load_tokenizer

    tok = load_tokenizer(templated_model_dir)
    ensure_pad_token(tok)  # the pad id tunesmith gives the model (left padding of the HF batches)
    hf_seen = hf_prompts_seen(base + ["--output", str(hf_out)], tok.pad_token_id)
    assert main(base + ["--output", str(vllm_out), "--backend", "vllm"]) == 0

    # the same prompts, token for token (the HF path runs them length-sorted in batches of 3)
    vllm_seen = [p["prompt_token_ids"] for p in fake_vllm.prompts]
    assert len(hf_seen) == len(vllm_seen) == 7
    assert sorted(map(tuple, hf_seen)) == sorted(map(tuple, vllm_seen))
    assert len({len(p) for p in vllm_seen}) > 1  # prompts of several lengths: padding was really stripped
    # ... in file order: each row's prompt decodes to its own instruction
    rows = [json.loads(x) for x in vllm_out.read_text().splitlines()]
    for row, ids in zip(rows, vllm_seen):
        assert row["instruction"] in tok.decode(ids)

    # one SamplingParams per request: distinct seeds, greedy as temperature 0, the HF path's stop ids and knobs
    params = [p.kwargs for p in fake_vllm.params]
    assert len(params) == 7 and len({p["seed"] for p in params}) == 7
    for p in params:
        assert p["temperature"] == 0.0 and p["stop_token_ids"] == [EOS] and p["max_tokens"] == 3
        assert p["min_tokens"] == 1 and p["repetition_penalty"] == 1.2
    assert fake_vllm.llm_kwargs["model"] == templated_model_dir and fake_vllm.llm_kwargs["load_format"] == "safetensors"
    assert fake_vllm.llm_kwargs["trust_remote_code"] is False

    # outputs decoded by the model's tokenizer without the EOS; truncated = budget used up without EOS
    for i, row in enumerate(rows):
        if i % 2 == 0:
            assert row["output"] == tok.decode(vllm_seen[i][-2:], skip_special_tokens=True)
            assert row["truncated"] is False and row["new_tokens"] == 3
        else:
            assert row["truncated"] is True and row["new_tokens"] == 3
        assert row["decoding"]["backend"] == "vllm"


def test_request_seeds_do_not_depend_on_the_other_prompts(templated_model_dir, alpaca_file, tmp_path, fake_vllm):
    def seeds(*extra):
        assert main(["generate", "--model", templated_model_dir, "--prompts", alpaca_file, "--output",
                     str(tmp_path / "o.jsonl"), "--backend", "vllm", "--do_sample", "true", "--temperature", "0.8",
                     "--top_p", "0.95", *extra]) == 0
        return [p.kwargs["seed"] for p in fake_vllm.params], [p.kwargs for p in fake_vllm.params]

    five, params = seeds("--limit", "5", "--seed", "3")
    three, _ = seeds("--limit", "3", "--seed", "3")
    other, _ = seeds("--limit", "3", "--seed", "4")
    assert three == five[:3]  # prompt i keeps its seed whatever else is in the run
    assert set(other).isdisjoint(three)  # another run seed, other streams
    assert all(p["temperature"] == 0.8 and p["top_p"] == 0.95 and p["top_k"] == -1 for p in params)


def test_explicit_request_seeds_and_adapter_refusal(templated_model_dir, tmp_path, fake_vllm):
    from tunesmith.errors import UserError
    from tunesmith.generate import generate_vllm

    generate_vllm(templated_model_dir, [[5, 6], [7, 8, 9]], request_seeds=[11, 12], do_sample=True)
    assert [p.kwargs["seed"] for p in fake_vllm.params] == [11, 12]
    with pytest.raises(ValueError, match="request_seeds"):
        generate_vllm(templated_model_dir, [[5, 6]], request_seeds=[1, 2])
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="tunesmith merge"):
        generate_vllm(str(tmp_path / "adapter"), [[5, 6]])


def test_missing_vllm_is_a_one_line_error(templated_model_dir, alpaca_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    code = main(["generate", "--model", templated_model_dir, "--prompts", alpaca_file,
                 "--output", str(tmp_path / "o.jsonl"), "--backend", "vllm"])
    assert code == 2 and "vllm package is not installed" in capsys.readouterr().err
