"""`tunesmith plan CONFIG`: peak GPU memory per device for a training config, before renting the GPUs.

The model is built on the meta device from its ``config.json`` (no weights are read), so parameter counts are exact,
LoRA counts included (peft wraps the meta model the way the recipe would). Memory is then estimated per GPU for every
parallel strategy:

    ddp                 every GPU holds everything (plus DDP's gradient buckets when there are several GPUs)
    fsdp_shard_grad_op  FSDP2 with reshard_after_forward false (ZeRO-2 like): parameters stay gathered from forward
                        to backward; gradients and optimizer state are sharded
    fsdp_full_shard     FSDP2 with reshard_after_forward true (ZeRO-3 like): everything sharded, one or two layers
                        gathered at a time
    zero2 / zero3       DeepSpeed ZeRO stages 2 / 3 (zero0 / zero1 are in :func:`model_state_bytes` too)

Bytes per parameter follow what each stack stores:

* transformers' Trainer (ddp, fsdp): the model's own dtype is the master copy. With a float32 model and bf16 / fp16
  autocast the trainable weights also get a 16-bit autocast copy (the "6 bytes per parameter" of mixed precision in
  transformers' GPU-memory guide); gradients are in the master dtype; Adam keeps two states in the master dtype.
  FSDP with mixed precision keeps float32 master shards (accelerate upcasts) and gathers 16-bit copies.
* DeepSpeed (zero*): 16-bit parameters and gradients, K = 12 bytes of optimizer state per parameter (float32 master
  copy, momentum, variance) as in the ZeRO paper (Rajbhandari et al. 2020): (2 + 2 + K) * Psi in total, the optimizer
  states sharded from stage 1, gradients from stage 2, parameters at stage 3.
* QLoRA: quantized linear weights at 4 + 8/64 + 32/(64*256) = 4.127 bits with double quantization (4.5 without),
  the QLoRA paper's figures; the other frozen weights in float32 (peft's prepare_model_for_kbit_training upcasts
  them) and adapters in float32 (peft's default).

Activations are the tensors a decoder layer keeps for backward, per token (bytes a of the compute dtype, hidden h,
key/value width h_kv, MLP width i, heads n, sequence s), modelled on Korthikanti et al. 2022 (arXiv 2205.05198) for
a pre-norm decoder with RMSNorm, rotary attention and a gated MLP, without dropout:

    2 norms (float32 upcast + cast + normalised output)  2 * (4 + 2a) * h
    attention kernel (q, k, v, output)                   a * (2h + 2h_kv)      eager adds (5 [+ a if 16-bit]) * n * s
    gated MLP (gate out, activation out, up out, product) 4a * i
    LoRA on a module (float32 adapters): its dropped-out input (+ mask) and A's output  5 * in + 4 * r

plus the logits, their float32 upcast (16-bit only) and the float32 log-softmax of the loss, (a + 4 [+ 4]) * vocab
per token, when the loss is computed from the model's whole logits. tunesmith's own losses (sft, spin, dpo, through
``scoring``) never build them: they keep the final hidden states of the scored positions (a * h per token) and
project ``scoring.CHUNK_LOGITS`` logits at a time, so the head costs (a + 4 [+ 4]) * CHUNK_LOGITS at most, whatever
the batch. With gradient checkpointing a
layer keeps only its input (a * h per token) and one layer is recomputed at a time. Frozen linear layers still keep
their inputs here (an overestimate of a few percent under LoRA). Not counted: the CUDA context and allocator
fragmentation (typically 1-3 GiB), temporary buffers of fused kernels, and communication buckets beyond DDP's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tunesmith.errors import UserError

GiB = 2**30
STRATEGIES = ("ddp", "fsdp_shard_grad_op", "fsdp_full_shard", "zero2", "zero3")
NF4_BITS = {True: 4 + 8 / 64 + 32 / (64 * 256), False: 4 + 32 / 64}  # double quantization on / off
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Shape:
    """What memory depends on, counted from the model built on the meta device."""

    params: int  # all parameters
    trainable: int  # parameters with gradients (all for full fine-tuning; adapters (+ saved modules) under LoRA)
    quantized: int  # frozen parameters stored in 4 bits (QLoRA)
    largest_unit: int  # parameters of the largest decoder layer / embedding: what FSDP and ZeRO-3 gather at once
    layers: int
    hidden: int
    kv_hidden: int
    intermediate: int
    heads: int
    vocab: int  # 0 for a classification head
    gated_mlp: bool
    lora: bool = False  # trainable parameters are LoRA adapters (stored in Precision.adapter)
    lora_inputs: list[tuple[int, int]] = field(default_factory=list)  # (in_features, r) of every adapter in a layer


@dataclass
class Precision:
    master: int  # bytes per parameter of the stored (master) weights
    compute: int  # bytes per element of activations / gathered parameters
    adapter: int = 4  # bytes per LoRA parameter (peft creates adapters in float32)


def optimizer_states(optim: str) -> tuple[int, int | None]:
    """(number of per-parameter states, bytes per state or None for 'the master dtype') of a TrainingArguments optim."""
    name = optim.lower()
    if "8bit" in name:
        return 2, 1
    if name.startswith(("sgd", "adafactor")):
        return 0, None  # SGD without momentum; Adafactor's factored states are negligible at this resolution
    if name.startswith(("rmsprop", "lion")):
        return 1, 4 if "32bit" in name else None
    return 2, 4 if "32bit" in name else None  # Adam / AdamW variants


def model_state_bytes(shape: Shape, strategy: str, precision: Precision, num_gpus: int = 1,
                      optim: str = "adamw_torch", double_quant: bool = True) -> dict[str, float]:
    """Weights, gradients, optimizer state and parameter buffers per GPU, in bytes."""
    if strategy not in STRATEGIES + ("zero0", "zero1"):
        raise UserError(f"unknown strategy '{strategy}' (choose {', '.join(STRATEGIES)})")
    n = max(1, num_gpus)
    t, q = shape.trainable, shape.quantized
    frozen = shape.params - t - q
    q_bytes = q * NF4_BITS[double_quant] / 8
    states, state_bytes = optimizer_states(optim)
    if strategy.startswith("zero"):
        half = 2 if precision.compute == 2 else 4
        weights = frozen * half + q_bytes + t * half
        grads = t * half
        opt = t * ((4 if half == 2 else 0) + states * (state_bytes or 4))  # fp32 master copy + states: K = 12
        stage = int(strategy[-1])
        opt /= n if stage >= 1 else 1
        grads /= n if stage >= 2 else 1
        weights /= n if stage >= 3 else 1
        buffers = 2 * shape.largest_unit * half if stage == 3 and n > 1 else 0
        return {"weights": weights, "gradients": grads, "optimizer": opt, "buffers": buffers}
    fsdp = strategy.startswith("fsdp")
    master = 4 if fsdp and precision.compute < 4 else precision.master  # accelerate upcasts FSDP master shards
    w_train = precision.adapter if shape.lora else master
    weights = frozen * master + q_bytes + t * w_train
    grads = t * w_train
    opt = t * states * (state_bytes or w_train)
    autocast_cache = t * precision.compute if w_train > precision.compute else 0  # 16-bit copies of trainable weights
    if strategy == "ddp":
        return {"weights": weights + autocast_cache, "gradients": grads, "optimizer": opt,
                "buffers": grads if n > 1 else 0}  # DDP's bucket copy of the gradients
    sharded = {"weights": weights / n, "gradients": grads / n, "optimizer": opt / n}
    if strategy == "fsdp_shard_grad_op":  # gathered 16-bit parameters live from forward to backward
        gathered = (frozen + t) * min(master, precision.compute) + q_bytes
        return sharded | {"buffers": gathered if n > 1 else autocast_cache}
    gathered = 2 * shape.largest_unit * min(master, precision.compute)  # this unit and the prefetched next one
    return sharded | {"buffers": gathered if n > 1 else autocast_cache}


def layer_bytes_per_token(shape: Shape, act: int, seq: int, attn_implementation: str = "sdpa",
                          adapter: int = 4) -> float:
    """Activation bytes one decoder layer keeps for backward, per token (module docstring)."""
    h, kv, i = shape.hidden, shape.kv_hidden, shape.intermediate
    norms = 2 * (4 + 2 * act) * h
    attention = act * (2 * h + 2 * kv)
    if attn_implementation == "eager":
        # float32 softmax output, its 16-bit cast (16-bit runs only) and the dropout mask (kept even at p = 0)
        attention += (4 + 1 + (act if act < 4 else 0)) * shape.heads * seq
    mlp = 4 * act * i if shape.gated_mlp else 2 * act * i  # non-gated: activation input and output
    lora = sum((adapter + 1) * fan_in + adapter * r for fan_in, r in shape.lora_inputs)
    return norms + attention + mlp + lora


def activation_bytes(shape: Shape, rows: int, length: int, act: int, gradient_checkpointing: bool,
                     attn_implementation: str = "sdpa", lean_logits: bool = False) -> float:
    """Activation bytes of one micro-batch. ``lean_logits``: the loss is tunesmith's (``scoring``), which projects a
    chunk of positions onto the vocabulary at a time instead of building the whole logits."""
    tokens = rows * length
    per_layer = layer_bytes_per_token(shape, act, length, attn_implementation) * tokens
    # the logits, their float32 upcast for the loss (when 16-bit) and the float32 log-softmax kept for backward
    per_logit = act + 4 + (4 if act < 4 else 0)
    if lean_logits and shape.vocab:
        from tunesmith.scoring import CHUNK_LOGITS

        chunk = min(tokens, max(1, CHUNK_LOGITS // shape.vocab)) * shape.vocab
        head = act * shape.hidden * tokens + per_logit * chunk
    else:
        head = per_logit * shape.vocab * tokens
    if gradient_checkpointing:
        return shape.layers * act * shape.hidden * tokens + per_layer + head
    return shape.layers * per_layer + head


# ------------------------------------------------------------------------------------------------ the model


def meta_model(config, task: str = "causal_lm", num_labels: int = 2):
    """The model of ``config`` (a transformers config) on the meta device: exact shapes, no memory."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with torch.device("meta"):
        if task == "seq_cls":
            config.num_labels = num_labels
            return AutoModelForSequenceClassification.from_config(config)
        return AutoModelForCausalLM.from_config(config)


def _decoder_layers(model) -> torch.nn.ModuleList:
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if not lists:
        raise UserError("cannot find the model's layer stack (no ModuleList)")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def measure(model, quantize: bool = False) -> Shape:
    """Count ``model`` (built on meta, LoRA-wrapped or not) into a :class:`Shape`."""
    config = model.config
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = _decoder_layers(base)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    quantized = 0
    if quantize:  # bitsandbytes quantizes every nn.Linear but the output projection
        out_emb = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        for module in base.modules():
            if type(module) is torch.nn.Linear and module is not out_emb and not module.weight.requires_grad:
                quantized += module.weight.numel()
    emb = base.get_input_embeddings().weight.numel()
    largest = max(max(sum(p.numel() for p in layer.parameters()) for layer in layers), emb)
    h = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    first = layers[0]
    plain = [m for n, m in first.named_modules() if type(m) is torch.nn.Linear and "lora_" not in n]
    lora = [m for n, m in first.named_modules() if n.endswith("lora_A.default") and isinstance(m, torch.nn.Linear)]
    widths = [m.out_features for m in plain if m.in_features == h and m.out_features not in (h, kv, heads * head_dim)]
    intermediate = getattr(config, "intermediate_size", None) or (max(widths) if widths else 4 * h)
    gated = sum(1 for m in plain if m.in_features == h and m.out_features == intermediate) >= 2
    vocab = config.vocab_size if hasattr(base, "get_output_embeddings") and base.get_output_embeddings() else 0
    return Shape(params=params, trainable=trainable, quantized=quantized, largest_unit=largest, layers=len(layers),
                 hidden=h, kv_hidden=kv, intermediate=intermediate, heads=heads, vocab=vocab, gated_mlp=gated,
                 lora=hasattr(model, "peft_config"), lora_inputs=[(m.in_features, m.out_features) for m in lora])


# ------------------------------------------------------------------------------------------------ from a config


SPIN_ONLY = {"num_iterations", "mix_previous_iteration", "max_new_tokens", "generation", "generation_batch_size",
             "generation_backend", "do_sample", "temperature", "top_p", "repetition_penalty"}
PREFERENCE = {"beta", "loss_type", "label_smoothing", "dpop_lambda", "simpo_gamma"}  # keys SPIN and DPO share


def recipe_of(values: dict) -> str:
    """The recipe a config's keys belong to: SPIN's generation keys say spin; the preference keys alone say dpo."""
    if SPIN_ONLY & set(values):
        return "spin"
    if PREFERENCE & set(values):
        return "dpo"
    if {"train_file", "labels", "text_column", "label_column", "multi_label"} & set(values):
        return "classify"
    return "sft"


def checkpoint_dtype(config) -> str:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(dtype).replace("torch.", "") if dtype else "float32"


def precision_of(values: dict, config) -> Precision:
    """Bytes of the stored weights and of the compute dtype on a GPU. ``dtype: auto`` (the default) is what the
    recipes do on a bf16 GPU: a 16-bit checkpoint loads as bfloat16, a float32 one as float32, bf16 mixed precision."""
    dtype = str(values.get("dtype", "auto"))
    mixed = values.get("bf16") or values.get("fp16")
    if dtype == "auto":
        dtype = "bfloat16" if checkpoint_dtype(config) in ("bfloat16", "float16") else "float32"
        mixed = mixed if "bf16" in values or "fp16" in values else True
    if dtype not in BYTES:
        raise UserError(f"field 'dtype': unknown dtype '{dtype}'")
    master = BYTES[dtype]
    return Precision(master=master, compute=2 if mixed else master)


def plan(values: dict, num_gpus: int = 1, source: str = "config") -> dict:
    """Estimate memory for a recipe config (a dict of its keys). Returns the settings used and one row per strategy."""
    from transformers import AutoConfig

    from tunesmith.config import LoraArgs
    from tunesmith.models import wrap_lora

    name = values.get("model_name_or_path")
    if not name:
        raise UserError(f"{source}: 'model_name_or_path' is required")
    try:
        config = AutoConfig.from_pretrained(str(name), revision=values.get("model_revision"),
                                            trust_remote_code=bool(values.get("trust_remote_code", False)))
    except (OSError, ValueError) as e:
        raise UserError(f"{source}: model_name_or_path {name}: cannot read config.json "
                        f"({str(e).splitlines()[0]})") from None
    recipe = recipe_of(values)
    quantize = bool(values.get("load_in_4bit"))
    lora = quantize or bool(values.get("use_peft") or values.get("use_lora", recipe == "classify"))
    task = "seq_cls" if recipe == "classify" else "causal_lm"
    model = meta_model(config, task, num_labels=len(values.get("labels") or [0, 1]))
    model.requires_grad_(True)
    if lora:
        default_targets = ["all-linear"] if recipe != "classify" else ["query", "q_lin", "q_proj"]
        targets = values.get("lora_target_modules") or default_targets
        if recipe == "classify" and not values.get("lora_target_modules"):
            names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
            targets = [next((t for t in default_targets if t in names), "all-linear")]
        head = ["classifier", "score"] if recipe == "classify" else None
        with torch.device("meta"):
            part = LoraArgs(lora_r=int(values.get("lora_r", 16)), lora_alpha=int(values.get("lora_alpha", 32)),
                            lora_dropout=float(values.get("lora_dropout", 0.05)), lora_target_modules=targets,
                            modules_to_save=[m for m in head or [] if any(
                                n.endswith(m) for n, _ in model.named_modules())] or None)
            model = wrap_lora(model, part, task_type="SEQ_CLS" if recipe == "classify" else "CAUSAL_LM")
    shape = measure(model, quantize)
    if float(values.get("lora_dropout", 0.05) if lora else 0) == 0:
        shape.lora_inputs = [(0, r) for _, r in shape.lora_inputs]
    precision = precision_of(values, config)
    if quantize:  # compute dtype of the 4-bit layers; frozen non-quantized weights upcast to float32 by peft
        precision.master = 4
    pairs = recipe in ("spin", "dpo")  # a pair is two answer rows in one forward
    rows_per_step = int(values.get("per_device_train_batch_size", 8)) * (2 if pairs else 1)
    length = int(values.get("max_length", 512))
    checkpointing = bool(values.get("gradient_checkpointing", False))
    optim = str(values.get("optim", "rmsprop" if recipe == "spin" else "adamw_torch"))
    attn = str(values.get("attn_implementation", "sdpa"))
    act = precision.compute
    result = {"model": str(name), "recipe": recipe, "method": "qlora" if quantize else "lora" if lora else "full",
              "params": shape.params, "trainable": shape.trainable, "quantized": shape.quantized,
              "num_gpus": num_gpus, "rows_per_micro_batch": rows_per_step, "max_length": length,
              "gradient_checkpointing": checkpointing, "optim": optim, "attn_implementation": attn,
              "master_bytes": precision.master, "compute_bytes": precision.compute, "strategies": {}}
    result["weights_by_kind"] = weight_kinds(shape, precision, bool(values.get("use_peft")) or quantize or lora)
    activations = activation_bytes(shape, rows_per_step, length, act, checkpointing, attn,
                                   lean_logits=recipe in ("sft", "spin", "dpo"))
    for strategy in STRATEGIES:
        parts = model_state_bytes(shape, strategy, precision, num_gpus, optim)
        parts["activations"] = activations
        parts["total"] = sum(parts.values())
        result["strategies"][strategy] = parts
    return result


DTYPE_NAMES = {4: "float32", 2: "16-bit"}


def weight_kinds(shape: Shape, precision: Precision, lora: bool, double_quant: bool = True) -> list[dict]:
    """The stored weights by kind, as the Trainer holds them under ddp: how many parameters, in what format, at how
    many bytes each. QLoRA's 4-bit weights are counted at their real size (4-bit codes plus the quantization
    constants), not at the compute dtype."""
    kinds = []
    if shape.quantized:
        kinds.append({"kind": "4-bit NF4 linear weights" + (" (double quantization)" if double_quant else ""),
                      "params": shape.quantized, "bytes_per_param": NF4_BITS[double_quant] / 8})
    frozen = shape.params - shape.trainable - shape.quantized
    if frozen:
        kinds.append({"kind": ("other frozen weights" if shape.quantized else "frozen weights")
                      + f" in {DTYPE_NAMES.get(precision.master, precision.master)}",
                      "params": frozen, "bytes_per_param": precision.master})
    if shape.trainable:
        width = precision.adapter if shape.lora else precision.master
        kinds.append({"kind": ("LoRA adapters" if shape.lora else "trained weights")
                      + f" in {DTYPE_NAMES.get(width, width)}", "params": shape.trainable, "bytes_per_param": width})
    return kinds


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def format_plan(result: dict, gpu_memory_gib: float) -> str:
    r = result
    kinds = r.get("weights_by_kind") or []
    stored = sum(k["params"] * k["bytes_per_param"] for k in kinds)
    lines = [f"{r['model']}: {r['params'] / 1e9:.3f}B parameters, {r['trainable'] / 1e6:.2f}M trainable "
             f"({r['method']}, {r['recipe']}), {r['num_gpus']} GPU(s)",
             f"per GPU and micro-batch: {r['rows_per_micro_batch']} rows x {r['max_length']} tokens, "
             f"{'with' if r['gradient_checkpointing'] else 'without'} gradient checkpointing, optim {r['optim']}, "
             f"compute in {DTYPE_NAMES.get(r['compute_bytes'], r['compute_bytes'])}"]
    if kinds:
        lines.append("weights as stored (ddp): " + "; ".join(
            f"{_count(k['params'])} {k['kind']} ({k['bytes_per_param']:.3g} B/param)" for k in kinds)
            + f" = {stored / r['params']:.3g} B/param on average")
    lines += ["", "| strategy | weights | gradients | optimizer | param buffers | activations | total GiB | fits "
              f"{gpu_memory_gib:g} GiB |", "|---|---|---|---|---|---|---|---|"]
    for name, p in r["strategies"].items():
        fits = "yes" if p["total"] <= 0.9 * gpu_memory_gib * GiB else "no"
        lines.append(f"| {name} | " + " | ".join(f"{p[k] / GiB:.2f}" for k in (
            "weights", "gradients", "optimizer", "buffers", "activations", "total")) + f" | {fits} |")
    lines += ["", "How the strategies store a model: ddp keeps the weights as listed above, gradients in their "
              "dtype and, under mixed precision, a 16-bit copy of the trained weights; fsdp keeps float32 master "
              "shards (accelerate upcasts a 16-bit model) and gathers 16-bit copies ('param buffers'); zero2 / zero3 "
              "(DeepSpeed) keep 16-bit weights and gradients and put the float32 master copy with the optimizer "
              "state (12 B per trained parameter with Adam)."]
    if r["num_gpus"] == 1:
        lines.append("On 1 GPU nothing is sharded: the strategies differ only in that bookkeeping (and ZeRO-3's "
                     "gather buffers), not in what is split; sharding (fsdp_*, zero*) saves memory from 2 GPUs on "
                     "(--num_gpus N).")
    lines.append("Estimates (see `tunesmith.plan`): CUDA context and allocator fragmentation (1-3 GiB) are not "
                 "included; 'fits' keeps 10% headroom.")
    return "\n".join(lines) + "\n"


def cli(argv: list[str]) -> int:
    """tunesmith plan CONFIG.yaml [--num_gpus N] [--gpu_memory_gib G] [--json true] [--key value ...]"""
    import json

    from tunesmith.config import parse_overrides, read_yaml

    if not argv or any(a in ("-h", "--help") for a in argv):
        print("usage: tunesmith plan CONFIG.yaml [--num_gpus N] [--gpu_memory_gib 80] [--json true] "
              "[--key value ...]\n\nEstimates peak GPU memory per device (weights, gradients, optimizer state, "
              "activations) for DDP, FSDP\n(shard_grad_op / full_shard) and DeepSpeed ZeRO-2/3, from the model's "
              "config.json (no weights are read)\nand the config's batch size, max_length, dtype, bf16, LoRA / QLoRA "
              "and gradient_checkpointing keys.\n--key value overrides a config key (e.g. "
              "--per_device_train_batch_size 4).")
        return 0
    path = None
    if not argv[0].startswith("--"):
        path, argv = argv[0], argv[1:]
    config_path, overrides = parse_overrides(argv)
    path = path or config_path
    values = read_yaml(path) if path else {}
    from tunesmith import checks
    from tunesmith.config import _coerce

    num_gpus = _coerce(overrides.pop("num_gpus", 1), int, "field 'num_gpus'")
    gpu_memory = _coerce(overrides.pop("gpu_memory_gib", 80), float, "field 'gpu_memory_gib'")
    as_json = _coerce(overrides.pop("json", False), bool, "field 'json'")
    values.update(overrides)
    checks.at_least("num_gpus", num_gpus, 1)
    checks.positive("gpu_memory_gib", gpu_memory)
    result = plan(values, num_gpus, source=path or "command line")
    print(json.dumps(result, indent=1) if as_json else format_plan(result, gpu_memory), end="" if not as_json else "\n")
    return 0
