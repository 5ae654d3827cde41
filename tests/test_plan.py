"""`tunesmith plan`: memory estimates checked against published figures (the ZeRO paper's 7.5B / 64-GPU example,
transformers' GPU-memory guide, the QLoRA paper's 65B-on-48GB claim) and activations against tensors measured on a
real (tiny) model. Expected values are the papers' numbers, not recomputed with tunesmith's formulas."""
import json

import pytest
import torch

from tunesmith.cli import main
from tunesmith.plan import (Precision, Shape, activation_bytes, layer_bytes_per_token, measure, meta_model,
                            model_state_bytes)

GB = 1e9

LLAMA_65B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
             "intermediate_size": 22016, "num_attention_heads": 64, "num_hidden_layers": 80,
             "num_key_value_heads": 64, "vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
             "tie_word_embeddings": False, "torch_dtype": "float16"}


def flat(params: float) -> Shape:
    """A model reduced to its parameter count (what the model-state formulas depend on)."""
    return Shape(params=int(params), trainable=int(params), quantized=0, largest_unit=0, layers=1, hidden=1,
                 kv_hidden=1, intermediate=1, heads=1, vocab=0, gated_mlp=False)


def states(parts):
    return parts["weights"] + parts["gradients"] + parts["optimizer"]


def test_zero_paper_7_5b_on_64_gpus():
    """ZeRO paper (Rajbhandari et al. 2020), Figure 1: Psi = 7.5B, N_d = 64, K = 12 (mixed-precision Adam):
    baseline 120 GB, P_os 31.4 GB, P_os+g 16.6 GB, P_os+g+p 1.88 GB per device."""
    shape, mixed = flat(7.5e9), Precision(master=2, compute=2)
    published = {"zero0": 120, "zero1": 31.4, "zero2": 16.6, "zero3": 1.88}
    for strategy, gb in published.items():
        got = states(model_state_bytes(shape, strategy, mixed, num_gpus=64, optim="adamw_torch")) / GB
        assert got == pytest.approx(gb, abs=0.05), strategy
    # per parameter: 2 (fp16 weights) + 2 (fp16 gradients) + 12 (fp32 master, momentum, variance)
    one = model_state_bytes(flat(1e9), "zero0", mixed, num_gpus=1)
    assert (one["weights"] / 1e9, one["gradients"] / 1e9, one["optimizer"] / 1e9) == (2, 2, 12)


def test_transformers_guide_mixed_precision_adamw_bytes_per_parameter():
    """transformers' "GPU memory usage" guide: mixed precision keeps 6 bytes/param of weights (fp32 + fp16 copy),
    AdamW 8 bytes/param (fp32 momentum and variance), gradients 4 bytes/param."""
    parts = model_state_bytes(flat(1e9), "ddp", Precision(master=4, compute=2), num_gpus=1, optim="adamw_torch")
    assert parts["weights"] / 1e9 == 6 and parts["optimizer"] / 1e9 == 8 and parts["gradients"] / 1e9 == 4
    # ... and the guide's quantized Adam (bitsandbytes): 2 bytes/param
    assert model_state_bytes(flat(1e9), "ddp", Precision(4, 2), optim="adamw_bnb_8bit")["optimizer"] / 1e9 == 2


@pytest.fixture(scope="module")
def llama_65b_qlora():
    from transformers import LlamaConfig

    from tunesmith.config import LoraArgs
    from tunesmith.models import wrap_lora

    model = meta_model(LlamaConfig(**{k: v for k, v in LLAMA_65B.items() if k != "architectures"}))
    n_params = sum(p.numel() for p in model.parameters())
    with torch.device("meta"):  # the QLoRA paper's 65B setting: r = 64 on every linear layer
        model = wrap_lora(model, LoraArgs(lora_r=64, lora_alpha=16, lora_dropout=0.05))
    return n_params, measure(model, quantize=True)


def test_qlora_fits_65b_on_one_48gb_gpu(llama_65b_qlora):
    """QLoRA paper (Dettmers et al. 2023): "finetune a 65B parameter model on a single 48GB GPU", down from
    "more than 780 GB" for regular 16-bit finetuning. Paper setup: NF4 with double quantization, LoRA r=64 on all
    linear layers with bf16 adapters (its qlora.py casts them), paged AdamW 32-bit, batch 1, length 512, gradient
    checkpointing."""
    n_params, shape = llama_65b_qlora
    assert 65.2e9 <= n_params < 65.3e9  # LLaMA paper, Table 2: 65.2B (truncated)
    paper = Precision(master=2, compute=2, adapter=2)
    parts = model_state_bytes(shape, "ddp", paper, num_gpus=1, optim="paged_adamw_32bit", double_quant=True)
    acts = activation_bytes(shape, rows=1, length=512, act=2, gradient_checkpointing=True)
    assert states(parts) + parts["buffers"] + acts < 48 * GB
    # weights: 64.7B linear weights at 4.127 bits (~33.4 GB) + 16-bit embeddings, head and adapters (~2.6 GB)
    assert 65.2e9 * 4 / 8 < parts["weights"] < 37 * GB
    # regular 16-bit mixed-precision finetuning of the same model, either stack: more than 780 GB
    full = flat(n_params)
    assert states(model_state_bytes(full, "zero0", Precision(2, 2))) > 780 * GB
    assert states(model_state_bytes(full, "ddp", Precision(4, 2))) > 780 * GB


def test_double_quantization_saves_about_3gb_on_65b(llama_65b_qlora):
    """QLoRA paper: double quantization saves 0.373 bits per parameter, "approximately 3 GB for a 65B model"."""
    _, shape = llama_65b_qlora
    p = Precision(2, 2, adapter=2)
    saved = (model_state_bytes(shape, "ddp", p, double_quant=False)["weights"]
             - model_state_bytes(shape, "ddp", p, double_quant=True)["weights"])
    assert saved == pytest.approx(3 * GB, rel=0.05)


def saved_bytes(layers, attn, dtype, lora):
    """Bytes of the tensors autograd keeps for backward in a real forward of a tiny Llama (parameters excluded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.config import LoraArgs
    from tunesmith.models import wrap_lora

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=96, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn)
    model = LlamaForCausalLM(cfg).to(dtype)
    if lora:
        model = wrap_lora(model, LoraArgs(lora_r=8, lora_alpha=16, lora_dropout=0.05))
    model.train()
    ids = torch.randint(0, 300, (2, 64))
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(v for k, v in seen.items() if k not in params), model


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_activation_estimate_matches_saved_tensors(attn, dtype, lora):
    """Per decoder layer and token: the difference between a 3-layer and a 1-layer model's saved tensors."""
    one, _ = saved_bytes(1, attn, dtype, lora)
    three, model = saved_bytes(3, attn, dtype, lora)
    measured = (three - one) / 2 / (2 * 64)
    act = 4 if dtype == torch.float32 else 2
    estimate = layer_bytes_per_token(measure(model), act, 64, attn)
    assert estimate == pytest.approx(measured, rel=0.15)
    # checkpointing keeps one layer input per layer instead of the layer's activations
    shape = measure(model)
    full = activation_bytes(shape, 2, 64, act, False, attn)
    ckpt = activation_bytes(shape, 2, 64, act, True, attn)
    assert ckpt < full


def test_sharding_divides_model_states():
    shape, p = flat(8e9), Precision(4, 2)
    one = states(model_state_bytes(shape, "fsdp_full_shard", p, num_gpus=1))
    eight = states(model_state_bytes(shape, "fsdp_full_shard", p, num_gpus=8))
    assert eight == pytest.approx(one / 8)
    ddp8 = model_state_bytes(shape, "ddp", p, num_gpus=8)
    assert ddp8["buffers"] == ddp8["gradients"]  # DDP's bucket copy of the gradients


def test_cli_plans_a_config(tmp_path, capsys):
    model = tmp_path / "llama-65b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_65B))
    cfg = tmp_path / "qlora.yaml"
    cfg.write_text(f"model_name_or_path: {model}\ndataset: d.jsonl\noutput_dir: o\nload_in_4bit: true\n"
                   "lora_r: 64\nper_device_train_batch_size: 1\nmax_length: 512\ngradient_checkpointing: true\n"
                   "bf16: true\n")
    assert main(["plan", str(cfg), "--num_gpus", "2", "--json", "true"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "qlora" and out["num_gpus"] == 2 and out["params"] > 65e9
    assert set(out["strategies"]) == {"ddp", "fsdp_shard_grad_op", "fsdp_full_shard", "zero2", "zero3"}
    ddp, zero3 = out["strategies"]["ddp"], out["strategies"]["zero3"]
    assert zero3["weights"] < ddp["weights"] / 1.5
    assert main(["plan", str(cfg)]) == 0
    assert "| fsdp_full_shard |" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model_name_or_path: {tmp_path / 'missing'}\n")
    assert main(["plan", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot read config.json" in err and len(err.splitlines()) == 1
    assert main(["plan", str(tmp_path / "nope.yaml")]) == 2


def test_sft_plan_counts_one_chunk_of_logits_not_the_whole_batch():
    """tunesmith's own loss (sft, spin) never builds batch x sequence x vocabulary logits: its estimate is what that
    loss keeps for backward (measured here) plus one transient chunk of logits, and a bigger batch adds no
    vocabulary-sized term; the whole-logits estimate (other trainers) covers what their loss keeps."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.scoring import CHUNK_LOGITS, causal_lm_loss

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=152064, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(cfg).train()
    ids = torch.randint(0, 152064, (2, 256))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def saved(fn):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        return sum(v for k, v in seen.items() if k not in params)

    lean_saved, full_saved = saved(lambda: causal_lm_loss(model, batch)), saved(lambda: model(**batch).loss)
    shape = measure(model)
    lean = activation_bytes(shape, 2, 256, 4, False, lean_logits=True)
    full = activation_bytes(shape, 2, 256, 4, False)
    assert lean_saved <= lean <= lean_saved + 8 * CHUNK_LOGITS
    assert full_saved <= full and lean < full / 2
    grow_lean = activation_bytes(shape, 8, 256, 4, False, lean_logits=True) - lean
    grow_full = activation_bytes(shape, 8, 256, 4, False) - full
    assert grow_lean < grow_full / 50


@pytest.mark.parametrize("keys, recipe, optim", [
    ("loss_type: sigmoid\nbeta: 0.1\n", "dpo", "adamw_torch"),  # examples/dpo.yaml's keys
    ("num_iterations: 2\nbeta: [0.1, 0.2]\n", "spin", "rmsprop"),
    ("beta: 0.1\nmax_new_tokens: 64\n", "spin", "rmsprop"),
    ("learning_rate: 1.0e-5\n", "sft", "adamw_torch"),
])
def test_cli_tells_dpo_from_spin_and_plans_pairs_as_two_rows(tmp_path, capsys, keys, recipe, optim):
    model = tmp_path / "llama-65b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_65B))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model_name_or_path: {model}\nper_device_train_batch_size: 4\n" + keys)
    assert main(["plan", str(cfg), "--json", "true"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["recipe"], out["optim"]) == (recipe, optim)
    assert out["rows_per_micro_batch"] == (4 if recipe == "sft" else 8)
