"""Issue 23.2: a LoRA SFT output (an adapter directory) is a starting model for every command that takes one: dpo and
spin train from it (its adapter trained further under use_peft, merged into its base for full training; either way the
reference is the SFT model itself), and generate, eval and merge run it."""
import json
from pathlib import Path

import pytest
import torch
from conftest import alpaca_rows, sft_config, write_jsonl
from test_dpo import dpo_config, metrics, preference_rows

from tunesmith.recipes import dpo, spin


@pytest.fixture(scope="module")
def sft_adapter(tiny_model_dir, tmp_path_factory):
    """A LoRA SFT output: an adapter directory saved with its template (qa) and tokenizer."""
    from tunesmith.recipes.sft.run import train as sft_train

    d = tmp_path_factory.mktemp("sft-lora")
    data = write_jsonl(d / "sft.jsonl", alpaca_rows(8))
    out = d / "run"
    sft_train(sft_config(tiny_model_dir, data, out, use_peft=True, lora_r=4, lora_alpha=8, template="qa",
                         learning_rate=1e-2, train_loss_eval_samples=0))
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    return {"dir": str(out), "data": data, "base": tiny_model_dir}


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", preference_rows(8))


@pytest.mark.parametrize("use_peft", [True, False])
def test_dpo_from_an_adapter_directory(sft_adapter, pairs_file, tmp_path, use_peft):
    out = tmp_path / "run"
    dpo.train(dpo_config(sft_adapter["dir"], pairs_file, out, use_peft=use_peft, template=None, num_train_epochs=1))
    logs = [e for e in metrics(out) if "rewards/margin" in e]
    assert logs[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-4)  # the reference is the SFT model
    if use_peft:  # the SFT adapter trained further: its own rank, the same base
        adapter = json.loads((out / "adapter_config.json").read_text())
        sft = json.loads((Path(sft_adapter["dir"]) / "adapter_config.json").read_text())
        assert adapter["r"] == sft["r"] == 4 and adapter["base_model_name_or_path"] == sft["base_model_name_or_path"]
    else:  # merged into its base, then every weight trained
        assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    assert json.loads((out / "tunesmith_template.json").read_text())["template"] == "qa"  # the SFT model's


@pytest.mark.parametrize("use_peft", [True, False])
def test_spin_from_an_adapter_directory(sft_adapter, tmp_path, use_peft):
    """Before: the training stage failed with "element 0 of tensors does not require grad" (a frozen adapter under a
    new one). Now iteration 0 generates and scores with the SFT model (base + adapter) and trains from it."""
    from test_spin import spin_config

    from tunesmith.models import load_model_and_tokenizer
    from tunesmith.preference.pairs import PairCollator, score_pairs

    out = tmp_path / "run"
    cfg = spin_config(sft_adapter["dir"], sft_adapter["data"], out, num_iterations=1, template=None,
                      use_peft=use_peft, lora_r=4, lora_alpha=8, max_new_tokens=6)
    final = spin.train(cfg)
    assert (Path(final) / "model.safetensors").exists() and not (Path(final) / "adapter_config.json").exists()
    logs = [json.loads(x) for x in (out / "iteration-0" / "metrics.jsonl").read_text().splitlines()]
    first = [e for e in logs if "rewards/margin" in e][0]["rewards/margin"]
    if not use_peft:  # (under LoRA the adapter's dropout is on in SPIN's training passes: not exactly 0)
        assert first == pytest.approx(0.0, abs=1e-4)
    # the stored reference is the SFT model's (base + adapter), not the bare base's
    run = spin.SpinRun(spin.SPINConfig.from_dict(cfg))
    pairs = run.pairs(0)
    sft, tok = load_model_and_tokenizer(sft_adapter["dir"])
    base, _ = load_model_and_tokenizer(sft_adapter["base"])
    collate = PairCollator(tok.pad_token_id, 256)
    with torch.no_grad():
        want = torch.tensor(score_pairs(sft.eval(), pairs, collate, 8, "cpu"))
        bare = torch.tensor(score_pairs(base.eval(), pairs, collate, 8, "cpu"))
    stored = torch.tensor([pairs["ref_chosen"], pairs["ref_rejected"]])
    assert torch.allclose(stored, want, atol=1e-4) and (stored - bare).abs().max() > 1e-2


def test_generate_eval_and_merge_run_an_adapter_directory(sft_adapter, tmp_path):
    from tunesmith.cli import main

    gen = tmp_path / "gen.jsonl"
    assert main(["generate", "--model_name_or_path", sft_adapter["dir"], "--prompts", sft_adapter["data"],
                 "--output", str(gen), "--max_new_tokens", "4", "--limit", "3"]) == 0
    assert len(gen.read_text().splitlines()) == 3
    result = tmp_path / "eval.json"
    assert main(["eval", "--model_name_or_path", sft_adapter["dir"], "--dataset", sft_adapter["data"],
                 "--output", str(result)]) == 0
    assert json.loads(result.read_text())
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", sft_adapter["dir"], "--output", str(merged)]) == 0
    assert (merged / "model.safetensors").exists() and (merged / "tunesmith_template.json").exists()


@pytest.mark.parametrize("use_peft", [True, False])
def test_sft_from_an_adapter_directory(sft_adapter, tmp_path, use_peft):
    """Before: full SFT from an adapter directory failed in training with "element 0 of tensors does not require
    grad" (the adapter loaded frozen), and use_peft stacked a second, new adapter on the frozen one. Now SFT starts
    from the SFT model itself: its adapter trained further (its own rank), or merged into its base and every weight
    trained. A learning rate of 1e-12 leaves the weights where they started, which shows where that was."""
    from safetensors.torch import load_file

    from tunesmith.models import load_model_and_tokenizer
    from tunesmith.recipes.sft.run import train as sft_train

    out = tmp_path / "run"
    sft_train(sft_config(sft_adapter["dir"], sft_adapter["data"], out, use_peft=use_peft, lora_r=8, template="qa",
                         learning_rate=1e-12, train_loss_eval_samples=0))
    start = Path(sft_adapter["dir"])
    if use_peft:
        adapter = json.loads((out / "adapter_config.json").read_text())
        assert adapter["r"] == 4  # the adapter's own rank, not the lora_r of this run
        before, after = load_file(start / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
        assert sorted(after) == sorted(before)  # one adapter, not a second stacked on the first
        assert all(torch.allclose(after[k], before[k], atol=1e-6) for k in before)
        return
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    merged, _ = load_model_and_tokenizer(sft_adapter["dir"])
    merged = merged.merge_and_unload().state_dict()
    trained = load_file(out / "model.safetensors")
    base = load_file(Path(sft_adapter["base"]) / "model.safetensors")
    moved = [k for k in trained if "q_proj" in k and not torch.allclose(base[k], merged[k], atol=1e-6)]
    assert moved and all(torch.allclose(trained[k], merged[k], atol=1e-6) for k in moved)  # the SFT model's weights
