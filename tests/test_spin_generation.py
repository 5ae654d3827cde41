"""Issue 18.8 (SPIN): the synthetic answers are decoded as the authors' HF script does by default (the checkpoint's
generation config: greedy unless it samples); their vLLM scripts' setting is offered by name; the policy's training
passes run without dropout, as their trainer does."""
import json
import shutil

import pytest
import torch
from transformers import GenerationConfig, TrainerCallback

from conftest import alpaca_rows, write_jsonl
from tunesmith.config import build_config
from tunesmith.errors import UserError
from tunesmith.recipes.spin.config import SPINArgs


def test_the_default_is_the_checkpoints_generation_config():
    args = build_config(SPINArgs, {})
    assert args.generation == "checkpoint" and args.disable_dropout is True
    greedy = args.sampling(GenerationConfig())
    assert greedy["do_sample"] is False
    sampling = args.sampling(GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, repetition_penalty=1.1))
    assert sampling == {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.1}
    assert args.sampling(None)["do_sample"] is False  # no generation config: generate()'s own default, greedy


def test_the_vllm_scripts_setting_by_name_and_custom_settings():
    vllm = build_config(SPINArgs, {"generation": "vllm_script"}).sampling(GenerationConfig(do_sample=False))
    assert vllm == {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
    assert build_config(SPINArgs, {}).max_new_tokens == 256
    chosen = build_config(SPINArgs, {"temperature": 0.8, "top_p": 0.95})  # the demo's chosen recipe
    assert chosen.generation == "custom"
    assert chosen.sampling(GenerationConfig())["do_sample"] and chosen.sampling(None)["temperature"] == 0.8
    assert build_config(SPINArgs, {"do_sample": False}).sampling(GenerationConfig(do_sample=True))["do_sample"] is False
    with pytest.raises(UserError, match=r"'temperature' applies to generation: custom"):
        build_config(SPINArgs, {"generation": "checkpoint", "temperature": 0.8})
    with pytest.raises(UserError, match=r"'generation' must be one of"):
        build_config(SPINArgs, {"generation": "authors"})


class DropoutProbe(TrainerCallback):
    def __init__(self):
        self.seen = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.seen = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)] + [
            m.attention_dropout for m in model.modules() if isinstance(getattr(m, "attention_dropout", None), float)]


def test_a_spin_run_generates_as_the_checkpoint_says_and_trains_without_dropout(tiny_model_dir, tmp_path):
    from test_spin import spin_config

    from tunesmith.recipes import spin

    sft = tmp_path / "sft"
    shutil.copytree(tiny_model_dir, sft)
    from tunesmith.data.templates import get_template, save_template

    save_template(get_template("alpaca"), sft)
    config = json.loads((sft / "config.json").read_text())
    config["attention_dropout"] = 0.3  # a model trained with dropout
    (sft / "config.json").write_text(json.dumps(config))
    GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, bos_token_id=0, eos_token_id=1).save_pretrained(sft)
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(8))
    cfg = spin_config(str(sft), data, tmp_path / "spin", num_iterations=1, save_strategy="no")
    del cfg["do_sample"]  # the default generation
    probe = DropoutProbe()
    spin.train(cfg, callbacks=[probe])
    state = json.loads((tmp_path / "spin" / "tunesmith_run.json").read_text())
    gen = state["stages"]["finished"]["iteration-0/generate"]
    assert gen["generation"] == "checkpoint" and gen["do_sample"] is True
    assert (gen["temperature"], gen["top_p"], gen["top_k"]) == (0.7, 0.9, 50)
    assert probe.seen and all(p == 0.0 for p in probe.seen), probe.seen
    saved = json.loads((tmp_path / "spin" / "iteration-0" / "model" / "config.json").read_text())
    assert saved["attention_dropout"] == 0.3  # the saved model keeps its own setting
