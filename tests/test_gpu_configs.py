"""The GPU path's ready configs, checked without a GPU:

* examples/accelerate/*.yaml go through accelerate's own launcher code (argument parsing, config merging and the
  environment it hands the processes), and the FSDP plugin is built from that environment;
* examples/paper/*.yaml are valid recipe configs with the papers' hyperparameters (PAPERS.md), and applied to the
  real architectures built on the meta device (config.json values written here, no weights) they give the
  trainable-parameter counts computed here from the layer shapes, the LoRA targets and the dtypes they promise.
"""
from pathlib import Path

import pytest
import torch
import yaml

from tunesmith.config import build_config, read_yaml

ROOT = Path(__file__).parent.parent
ACCELERATE = ROOT / "examples" / "accelerate"
PAPER = ROOT / "examples" / "paper"

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, hidden_act="silu")
MISTRAL_7B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, hidden_act="silu", sliding_window=4096)


def launch_env(name: str):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(ACCELERATE / f"{name}.yaml"), "-m",
                                               "tunesmith.cli", "sft", "--config", "x.yaml"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:  # what accelerate's launch_command sets before calling the DeepSpeed launcher
        args.deepspeed_fields_from_accelerate_config = ",".join(list(defaults.deepspeed_config) + ["mixed_precision"])
        return args, prepare_deepspeed_cmd_env(args)[1]
    return args, prepare_multi_gpu_env(args)


def test_ddp_config():
    args, env = launch_env("ddp")
    assert args.multi_gpu and args.num_processes == 8 and not args.use_fsdp and not args.use_deepspeed
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_fsdp2_config_builds_the_plugin(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin

    args, env = launch_env("fsdp2")
    assert args.use_fsdp and env["FSDP_VERSION"] == "2"
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # FULL_SHARD
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)  # the saved model is whole
    assert plugin.cpu_ram_efficient_loading is True and plugin.auto_wrap_policy is not None


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs(stage):
    args, env = launch_env(f"zero{stage}")
    assert args.use_deepspeed and args.num_processes == 8
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(stage)
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    if stage == 3:  # the Trainer gathers a whole 16-bit state dict to save
        assert env["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] == "true"
        assert env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "true"


# ------------------------------------------------------------------------------------------------ paper recipes


def recipe_config(path: Path):
    values = read_yaml(path)
    values["use_cpu"] = True  # bf16 needs a GPU; the keys are what is checked
    values.pop("bf16", None)
    if path.name.startswith("spin"):
        from tunesmith.recipes.spin import SPINConfig
        return build_config(SPINConfig, values, str(path)), read_yaml(path)
    from tunesmith.recipes.sft import SFTConfig
    return build_config(SFTConfig, values, str(path)), read_yaml(path)


def num_processes(name: str) -> int:
    return yaml.safe_load((ACCELERATE / f"{name}.yaml").read_text())["num_processes"]


def meta_model(arch: str, values: dict, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(arch, **values)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def full_count(c: dict) -> int:
    """Parameters of a Llama/Mistral decoder from its shapes: embeddings, head, attention, gated MLP, 2 norms/layer."""
    h, i, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return 2 * V * h + L * per_layer + h


def test_full_count_matches_published_sizes():
    assert full_count(LLAMA2_7B) == 6_738_415_616  # Llama-2-7b (the model card's "7B"; HF's 6.74B)
    assert full_count(MISTRAL_7B) == 7_241_732_096  # Mistral-7B ("7.24B")


def test_neftune_llama2_7b_alpaca_full():
    from tunesmith.models import resolve_dtype

    cfg, raw = recipe_config(PAPER / "neftune_llama2_7b_alpaca.yaml")
    # the paper's settings (PAPERS.md)
    assert cfg.neftune.neftune_noise_alpha == 5 and cfg.neftune.neftune_noise_distribution == "uniform"
    assert cfg.training.learning_rate == 5e-5 and cfg.training.num_train_epochs == 3 and cfg.data.max_length == 512
    args = cfg.training
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * num_processes("fsdp2") == 128
    assert raw["bf16"] is True and cfg.training.optim.value.startswith("adam") and not cfg.lora.use_peft
    assert cfg.data.dataset == "tatsu-lab/alpaca" and cfg.model.model_name_or_path == "meta-llama/Llama-2-7b-hf"
    model = meta_model("llama", LLAMA2_7B, resolve_dtype(cfg.model.dtype))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == full_count(LLAMA2_7B)
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # float32 master weights, bf16 compute


def test_neftune_llama2_7b_alpaca_qlora_single_gpu():
    from tunesmith.models import resolve_dtype, wrap_lora

    cfg, raw = recipe_config(PAPER / "neftune_llama2_7b_alpaca_qlora.yaml")
    assert cfg.model.load_in_4bit and cfg.lora.use_peft and cfg.neftune.neftune_noise_alpha == 5
    assert cfg.training.per_device_train_batch_size * cfg.training.gradient_accumulation_steps == 128  # one GPU
    assert (cfg.lora.lora_r, cfg.lora.lora_alpha, cfg.lora.lora_dropout) == (64, 16, 0.1)  # QLoRA paper, 7B
    assert cfg.model.dtype == "bfloat16" and raw["bf16"] is True
    model = meta_model("llama", LLAMA2_7B, resolve_dtype(cfg.model.dtype))
    with torch.device("meta"):
        model = wrap_lora(model, cfg.lora)
    h, i, L, r = LLAMA2_7B["hidden_size"], LLAMA2_7B["intermediate_size"], LLAMA2_7B["num_hidden_layers"], 64
    # r * (in + out) for q, k, v, o (h -> h), gate and up (h -> i), down (i -> h), in every layer
    expected = L * r * (4 * (h + h) + 2 * (h + i) + (i + h))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == expected == 159_907_840
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all("lora_" in n for n in trainable)  # nothing else trains; the output head is not adapted
    assert {p.dtype for p in trainable.values()} == {torch.float32}  # adapters in float32 (peft)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}  # base in the compute dtype (4-bit on a GPU: bitsandbytes needs CUDA)


def test_spin_zephyr_7b_ultrachat():
    from tunesmith.models import resolve_dtype

    cfg, raw = recipe_config(PAPER / "spin_zephyr_7b_ultrachat.yaml")
    assert cfg.model.model_name_or_path == "alignment-handbook/zephyr-7b-sft-full"
    assert cfg.spin.num_iterations == 4
    assert cfg.spin.learning_rate == [5e-7, 5e-7, 1e-7, 1e-7] and cfg.spin.beta == [0.1, 0.1, 0.1, 5.0]
    spin, args = cfg.spin, cfg.training
    assert spin.num_train_epochs == [2.0] * 4 and spin.mix_previous_iteration and spin.loss_type == "sigmoid"
    assert args.optim.value == "rmsprop" and args.weight_decay == 0 and args.lr_scheduler_type.value == "linear"
    assert cfg.training.warmup_steps == 0.1 and cfg.data.max_length == 2048
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * num_processes("zero3") == 64
    # decoded as the authors' HF script: the checkpoint's generation config, 256 new tokens; dropout off in training
    assert spin.generation == "checkpoint" and spin.max_new_tokens == 256 and spin.disable_dropout
    assert cfg.model.model_revision == "ac6e600eefcce74f5e8bae1035d4f66019e93190"
    assert cfg.data.template == "### Instruction: {prompt}\n\n### Response: {response}"
    model = meta_model("mistral", MISTRAL_7B, resolve_dtype(cfg.model.dtype))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == full_count(MISTRAL_7B)
    assert not cfg.lora.use_peft and {p.dtype for p in model.parameters()} == {torch.float32}
