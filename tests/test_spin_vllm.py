"""SPIN with ``generation_backend: vllm``, against the recording stand-in vLLM module of test_generate_vllm: vLLM gets
theta_t's path, exactly the prompt ids the HF backend generates from, and per-prompt seeds derived from each shard's
seed; its answers become the shards the rest of the iteration trains on."""
import json
import sys

from conftest import alpaca_rows, sft_config, write_jsonl
from test_generate_vllm import EOS, FakeVLLM

from tunesmith.config import build_config
from tunesmith.generate import request_seed
from tunesmith.recipes import spin
from tunesmith.recipes.spin.data import shard_seed


def test_spin_generates_with_vllm(tiny_model_dir, tmp_path, monkeypatch):
    fake = FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    data = write_jsonl(tmp_path / "sft.jsonl", alpaca_rows(12))
    cfg = sft_config(tiny_model_dir, data, tmp_path / "run", max_length=256, num_iterations=1, beta=0.5,
                     learning_rate=3e-3, num_train_epochs=1, max_new_tokens=6, shard_size=5, do_sample=True,
                     temperature=0.8, top_p=0.95, generation_backend="vllm", per_device_eval_batch_size=8, seed=7)
    del cfg["train_loss_eval_samples"]
    final = spin.train(cfg)

    run = spin.SpinRun(build_config(spin.SPINConfig, cfg))
    assert fake.llm_kwargs["model"] == tiny_model_dir  # theta_0, loaded by vLLM itself
    assert [p["prompt_token_ids"] for p in fake.prompts] == run.prompts["prompt_ids"]
    shards = [run.prompts[k * 5:(k + 1) * 5]["prompt_ids"] for k in range(3)]
    expected = [request_seed(shard_seed(7, 0, k), j) for k, shard in enumerate(shards) for j in range(len(shard))]
    params = [p.kwargs for p in fake.params]
    assert [p["seed"] for p in params] == expected
    assert all(p["temperature"] == 0.8 and p["top_p"] == 0.95 and p["max_tokens"] == 6 for p in params)
    # the shards hold vLLM's answers (EOS kept, as the HF backend keeps it), and the iteration trained on them
    from datasets import Dataset

    rows = [r for k in range(3)
            for r in Dataset.from_file(str(tmp_path / "run/iteration-0/generations" / f"shard-{k:05d}.arrow"))]
    assert [r["index"] for r in rows] == list(range(12))
    for i, r in enumerate(rows):
        prompt = run.prompts[i]["prompt_ids"]
        assert r["ids"] == (prompt[-2:] + [EOS] if i % 2 == 0 else (prompt * 6)[:6])
    done = json.loads((tmp_path / "run/tunesmith_run.json").read_text())["stages"]["finished"]
    assert done["iteration-0/generate"]["backend"] == "vllm"
    assert done["iteration-0/train"]["steps"] > 0 and final.endswith("iteration-0/model")
