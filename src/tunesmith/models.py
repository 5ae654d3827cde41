"""Model I/O every recipe shares: loading models and tokenizers (local directory or hub id) with one pad-token rule,
LoRA / QLoRA wrapping, one atomic save of a model directory, train/eval mode switching, and ``tunesmith merge``."""
from __future__ import annotations

import json
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.config import field
from tunesmith.errors import UserError, first_line

log = logging.getLogger("tunesmith")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PAD_TOKEN = "<|pad|>"


def unwrap_distributed(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / DeepSpeed wrappers (PEFT wrappers are kept: they forward to their base)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def resolve_dtype(name: str, checkpoint_dtype=None):
    """The torch dtype to load weights in. ``auto``: float32 on CPU (and for float32 checkpoints); on a GPU, a 16-bit
    checkpoint (``checkpoint_dtype``, from its config.json) loads as bfloat16 where the GPU supports it, else float32
    (fp16 weights cannot be trained without a float32 master copy)."""
    if name == "auto":
        sixteen = str(checkpoint_dtype).replace("torch.", "") in ("bfloat16", "float16")
        if sixteen and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype '{name}' (choose float32, bfloat16, float16 or auto)")
    return DTYPES[name]


def _check_source(path: str) -> None:
    p = Path(path)
    looks_local = p.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local and not p.is_dir():
        raise UserError(f"{path}: model directory not found")


def check_weights(path: str) -> None:
    """A local model directory whose .safetensors files are torn (a copy or a save cut short) is a one-line error,
    not a traceback from deep inside the loader."""
    from tunesmith.rundir import safetensors_problem

    p = Path(path)
    if not p.is_dir():
        return
    for f in sorted(p.glob("*.safetensors")):
        problem = safetensors_problem(f)
        if problem:
            raise UserError(f"{path}: cannot load model ({problem})")


def load_tokenizer(path: str, trust_remote_code: bool = False, revision: str | None = None,
                   chat_template: str | None = None):
    """The tokenizer at ``path`` (``revision`` on the hub); ``chat_template``: a Jinja file replacing its template."""
    from transformers import AutoTokenizer

    from tunesmith.config import read_chat_template

    _check_source(path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{path}: cannot load tokenizer ({first_line(e)})") from None
    if chat_template:
        tok.chat_template = read_chat_template(chat_template)
    return tok


def checkpoint_dtype(path: str, revision: str | None = None, trust_remote_code: bool = False):
    """The dtype a checkpoint's config.json declares (None if it declares none or cannot be read)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None
    return getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)


def model_options(cfg) -> dict:
    """The model part's and data part's keys every model load takes (keyword arguments of
    :func:`load_model_and_tokenizer`); ``cfg``: a recipe's :class:`tunesmith.config.Config`."""
    return {"revision": cfg.model.model_revision, "attn_implementation": cfg.model.attn_implementation,
            "chat_template": getattr(cfg.data, "chat_template", None)}


def ensure_pad_token(tokenizer, model=None, eos_pads: bool = False) -> bool:
    """The one pad-token rule. Returns True if a token was added.

    A causal LM learns from its tokens, so padding with EOS would hide EOS from the loss in many collators: a tokenizer
    without a pad token, or whose pad is EOS, gets a dedicated ``<|pad|>`` (``model``'s embeddings grow to match).
    ``eos_pads=True`` is for heads that never score the pad token (sequence classification reads the last real
    token): there a missing pad token becomes EOS, and no untrained embedding row is added.
    """
    if eos_pads:
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise UserError(f"{tokenizer.name_or_path}: the tokenizer has neither a pad nor an EOS token to pad "
                                "batches with")
            tokenizer.pad_token = tokenizer.eos_token
        return False
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    # No pad token, or pad == EOS (which hides EOS from the loss in many collators): add a dedicated one.
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if model is not None:
        rows = model.get_input_embeddings().weight.shape[0]
        resize_embeddings(model, len(tokenizer))
        if rows < len(tokenizer):
            log.info(f"tunesmith: added a dedicated pad token {PAD_TOKEN}: the embedding grows from {rows} to "
                     f"{len(tokenizer)} rows (the new row is the mean of the others)")
    return True


def resize_embeddings(model, vocab_size: int) -> None:
    if model.get_input_embeddings().weight.shape[0] < vocab_size:
        model.resize_token_embeddings(vocab_size, mean_resizing=True)
    model.config.pad_token_id = None  # set by the caller from the tokenizer


def load_model_and_tokenizer(path: str, dtype: str = "float32", load_in_4bit: bool = False,
                             trust_remote_code: bool = False, model_class=None, revision: str | None = None,
                             attn_implementation: str | None = None, chat_template: str | None = None,
                             trainable_adapter: bool = False, gradient_checkpointing: bool = False):
    """Load a causal LM (or ``model_class``) and its tokenizer; safetensors only; adds a dedicated pad token.

    ``path`` may also be a LoRA adapter directory saved by tunesmith: its base is loaded (resized to the adapter's
    tokenizer) and the adapter applied, frozen for inference, or with ``trainable_adapter`` ready to be trained
    further (a 4-bit base is prepared for k-bit training first; ``gradient_checkpointing`` as the training sets it).
    """
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(path, trust_remote_code, revision, chat_template)
    adapter_cfg = Path(path) / "adapter_config.json"
    base = json.loads(adapter_cfg.read_text())["base_model_name_or_path"] if adapter_cfg.exists() else path
    if adapter_cfg.exists():
        _check_source(base)
    auto = checkpoint_dtype(base, revision, trust_remote_code) if dtype == "auto" else None
    kwargs = dict(dtype=resolve_dtype(dtype, auto), trust_remote_code=trust_remote_code, use_safetensors=True,
                  revision=revision)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        compute = kwargs["dtype"]
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute)
    cls = model_class or AutoModelForCausalLM
    check_weights(base)
    if adapter_cfg.exists():
        check_weights(path)
    try:
        with _quiet_load_report():
            model, info = cls.from_pretrained(base, output_loading_info=True, ignore_mismatched_sizes=True,
                                              **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{base}: cannot load model ({first_line(e)})") from None
    check_loading_info(base, info)
    check_finite_weights(model, base)
    check_vocabulary(model, tokenizer, path)
    ensure_pad_token(tokenizer, model)
    if adapter_cfg.exists():
        from peft import PeftModel

        resize_embeddings(model, len(tokenizer))
        if trainable_adapter and load_in_4bit:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        model = PeftModel.from_pretrained(model, path, is_trainable=trainable_adapter)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


@contextmanager
def _quiet_load_report():
    """transformers prints a many-line table of missing / unexpected / mismatched weights while loading; tunesmith
    reports the same problems itself, in one line (:func:`check_loading_info`)."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def _names(keys, n: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def check_loading_info(source: str, info: dict, intended_missing=()) -> None:
    """Weights the checkpoint lacks (they would start from random values), holds beyond the model (another
    architecture, or a wrong config), or holds in another shape: one line each, before any training."""
    missing = {k for k in info.get("missing_keys") or () if not any(k.startswith(m) for m in intended_missing)}
    if missing:
        raise UserError(f"{source}: the checkpoint lacks {len(missing)} weight(s) the model needs "
                        f"({_names(missing)}); they would start from random values — a torn or partial checkpoint, "
                        f"or another architecture than config.json names")
    unexpected = set(info.get("unexpected_keys") or ())
    if unexpected:
        raise UserError(f"{source}: the checkpoint holds {len(unexpected)} weight(s) not in the model "
                        f"({_names(unexpected)}); config.json does not describe these weights")
    mismatched = list(info.get("mismatched_keys") or ())
    if mismatched:
        shown = "; ".join(f"{k[0]} has shape {list(k[1])}, the model expects {list(k[2])}" if isinstance(k, tuple)
                          and len(k) == 3 else str(k) for k in sorted(mismatched)[:2])
        raise UserError(f"{source}: {len(mismatched)} weight(s) of the wrong shape ({shown}); config.json does not "
                        f"match the weights")


def check_finite_weights(model, source: str) -> None:
    """Every floating-point weight and buffer must be finite (a NaN base trains to a NaN model). A NaN or inf makes
    a sum non-finite, so each tensor is checked by float32 sums over chunks of 16M elements (no temporary the size of
    the tensor; 14x faster than ``isfinite().all()`` on CPU, measured on 64M floats: 0.23 s vs 3.2 s); only a
    non-finite sum is then counted exactly (a sum overflowing from huge finite weights is not an error here)."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not t.is_floating_point() or t.device.type == "meta" or t.numel() == 0:
            continue
        flat = t.detach().reshape(-1)
        for chunk in flat.split(1 << 24):
            if bool(torch.isfinite(chunk.sum(dtype=torch.float32))):
                continue
            bad = int((~torch.isfinite(flat)).sum())
            if bad:
                raise UserError(f"{source}: weight {name} holds {bad} non-finite value(s) (NaN or inf); the model "
                                f"cannot be trained or used")


def check_vocabulary(model, tokenizer, source: str) -> None:
    """A tokenizer with more tokens than the model has embedding rows would make the model grow random rows for
    them (or index past its table). Only tunesmith's own pad token may be missing (it is added on purpose)."""
    embedding = model.get_input_embeddings()
    rows = getattr(getattr(embedding, "weight", None), "shape", [None])[0]
    if rows is None or len(tokenizer) <= rows:
        return
    extra = tokenizer.convert_ids_to_tokens(list(range(rows, len(tokenizer))))
    if any(t != PAD_TOKEN for t in extra):
        raise UserError(f"{source}: the tokenizer has {len(tokenizer)} tokens but the model only {rows} embedding "
                        f"rows; they do not belong together (another tokenizer, or a vocab_size that is too small)")


def disable_dropout(model) -> None:
    """Switch every dropout of ``model`` off, in training mode too: ``nn.Dropout`` modules (LoRA's included) get
    p = 0, and attention modules' ``attention_dropout`` (transformers applies it inside the attention call) 0 — what
    TRL's ``disable_dropout_in_model`` does for the modules, and what SPIN's authors' trainer asks for
    (``disable_dropout=True``). The model's config is left as it is (a saved model keeps its own dropout)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


@contextmanager
def eval_mode(model):
    """``with eval_mode(model):`` runs the block with the model in eval mode and restores its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def gathered_state_dict(model, accelerator=None) -> dict | None:
    """The whole model's state dict on rank 0 (empty elsewhere), gathered from FSDP / ZeRO-3 shards; None in a single
    process (save the model's own weights).

    COLLECTIVE: under torch.distributed every rank must call it (rank 0 alone would wait for the others forever).
    DeepSpeed goes through ``accelerator.get_state_dict`` (ZeRO-3 needs ``zero3_save_16bit_model``); FSDP (1 and 2),
    DDP and plain modules through torch's ``get_model_state_dict`` with a full, CPU-offloaded state dict.
    """
    if accelerator is not None and getattr(accelerator.distributed_type, "value", "") == "DEEPSPEED":
        return accelerator.get_state_dict(model)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None  # one process: the model's own weights are whole
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(unwrap_distributed(model),
                                options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_model_dir(model, tokenizer, path, write=None, copy_from=(), owner: str | None = None,
                   state_dict: dict | None = None, template=None) -> Path:
    """Save ``model`` (safetensors) and ``tokenizer`` to the directory ``path`` so that a crash never leaves something
    that looks like a complete model: everything is written into a fresh temporary directory first (nothing that
    exists is ever cleared to make room for it).

    ``template``: the prompt template the model was trained with; it is saved as ``tunesmith_template.json`` and as
    the tokenizer's ``chat_template`` (:func:`tunesmith.data.templates.save_template`), so every runtime prompts the
    model as it was trained. ``write(tmp)`` may add files (config); ``copy_from`` lists files copied in when they
    exist.
    ``owner`` (a command, e.g. "merge"): ``path`` is a whole directory that command owns; it is renamed into place in
    one step, and an existing one is replaced only if that command wrote it (see
    :func:`tunesmith.rundir.publish_dir`: a user's directory is refused, never deleted). Without ``owner``, a new
    ``path`` is renamed into place, and an existing ``path`` (a run's output directory, which also holds checkpoints
    and logs) receives the files one by one, ``config.json`` (what makes it loadable) last.
    ``state_dict``: the weights to write (from :func:`gathered_state_dict` when the model is sharded); default the
    model's own.
    """
    import tempfile

    from tunesmith.io import follow_umask
    from tunesmith.rundir import check_replaceable, publish_dir, staging_dir, temp_prefix

    path = Path(path)
    if owner is not None:
        check_replaceable(path, owner)  # refuse before the work, not after
    into = owner is None and path.is_dir()
    tmp = (Path(tempfile.mkdtemp(prefix=temp_prefix("model"), suffix=".partial", dir=path)) if into
           else staging_dir(path))
    try:
        extra = {} if state_dict is None else {"state_dict": state_dict}
        model.save_pretrained(tmp, safe_serialization=True, **extra)
        if template is not None:
            from tunesmith.data.templates import save_template

            save_template(template, tmp, tokenizer)
        elif tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for src in map(Path, copy_from):
            if src.exists():
                shutil.copy(src, tmp / src.name)
        if write is not None:
            write(tmp)
        follow_umask(tmp)  # safetensors writes 0600, mkdtemp makes 0700: give what plain files and folders get
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if owner is not None:
        return publish_dir(tmp, path, owner)
    if not into:
        os.replace(tmp, path)
        return path
    for f in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):
        os.replace(f, path / f.name)
    tmp.rmdir()
    return path


def check_module_names(model, target_modules, modules_to_save) -> None:
    """Every name in ``lora_target_modules`` and ``modules_to_save`` must name a module of the model, matched as
    peft matches it (a target: the module's name or its last dotted parts; a module to save: a suffix of the name).
    peft itself fails only when no target at all matches, and ignores a module to save that matches nothing."""
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(target_modules, (list, tuple)):
        missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            raise UserError(f"field 'lora_target_modules': {', '.join(repr(t) for t in missing)}: no module of "
                            f"this model has that name (e.g. {', '.join(_leaf_names(model)[:8])})")
    missing = [t for t in modules_to_save or () if not any(n.endswith(t) for n in names)]
    if missing:
        raise UserError(f"field 'modules_to_save': {', '.join(repr(t) for t in missing)}: no module of this model "
                        f"has that name (e.g. {', '.join(_leaf_names(model)[:8])})")


def _leaf_names(model) -> list[str]:
    seen: dict[str, None] = {}
    for n, m in model.named_modules():
        if n and not list(m.children()):
            seen.setdefault(n.rsplit(".", 1)[-1], None)
    return list(seen)


def wrap_lora(model, lora, task_type: str = "CAUSAL_LM", quantized: bool = False,
              gradient_checkpointing: bool = False):
    """``model`` with a LoRA adapter as the config's LoRA part (:class:`tunesmith.config.LoraArgs`) describes it:
    rank, alpha, dropout, target modules (``all-linear`` or names) and modules trained fully. ``quantized``: a 4-bit
    base, prepared for k-bit training first."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    targets = lora.lora_target_modules
    if isinstance(targets, (list, tuple)) and len(targets) == 1 and targets[0] == "all-linear":
        targets = "all-linear"
    check_module_names(model, targets, lora.modules_to_save)
    config = LoraConfig(r=lora.lora_r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                        target_modules=targets, task_type=task_type, modules_to_save=lora.modules_to_save)
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise UserError(f"lora_target_modules {lora.lora_target_modules}: {first_line(e)}") from None


def is_adapter_dir(path: str) -> bool:
    """Whether ``path`` is a LoRA adapter directory (``tunesmith sft use_peft: true`` saves one) rather than a model."""
    return (Path(path) / "adapter_config.json").is_file()


def load_for_training(cfg, path: str | None = None, revision: str | None = None):
    """The model a training recipe starts from, ready to train as ``cfg`` (a recipe config with model, data, lora and
    training parts) says: a plain model, wrapped in a new LoRA adapter under ``use_peft``. When the starting model is
    a LoRA adapter directory (a LoRA SFT output), it is its base with that adapter: trained further as it is under
    ``use_peft`` (the adapter's own rank and target modules; the lora_* keys do not apply), merged into the base for
    full fine-tuning otherwise. ``path`` / ``revision``: another starting model than ``model_name_or_path`` (SPIN's
    later iterations)."""
    import logging

    m, lora = cfg.model, cfg.lora
    path = path or m.model_name_or_path
    options = model_options(cfg) if path == m.model_name_or_path else {"revision": revision}
    options["attn_implementation"] = m.attn_implementation
    checkpointing = bool(cfg.training.gradient_checkpointing)
    if is_adapter_dir(path):
        model, _ = load_model_and_tokenizer(path, m.dtype, m.load_in_4bit, m.trust_remote_code,
                                            trainable_adapter=lora.use_peft, gradient_checkpointing=checkpointing,
                                            **options)
        if lora.use_peft:
            logging.getLogger("tunesmith").warning(
                f"{path}: a LoRA adapter; training it further (its own rank and target modules; lora_* keys do not "
                "apply)")
            return model
        model = model.merge_and_unload()
        model.requires_grad_(True)  # PEFT froze the base; full fine-tuning trains every weight
        return model
    model, _ = load_model_and_tokenizer(path, m.dtype, m.load_in_4bit, m.trust_remote_code, **options)
    if lora.use_peft:
        model = wrap_lora(model, lora, quantized=m.load_in_4bit, gradient_checkpointing=checkpointing)
    return model


def resume_or_load(cfg, checkpoint: str | None):
    """``(model, done)``: the model a training run starts from (:func:`load_for_training`), or, when ``checkpoint``
    had reached max_steps (a run killed after its last checkpoint), that checkpoint as the trained model, with
    ``done`` True: no step is taken past max_steps."""
    import logging

    from tunesmith.rundir import training_done

    m = cfg.model
    if checkpoint is None or not training_done(checkpoint):
        return load_for_training(cfg), False
    logging.getLogger("tunesmith").warning(f"{checkpoint}: training had reached max_steps; saving the model from it")
    model, _ = load_model_and_tokenizer(checkpoint, m.dtype, m.load_in_4bit, m.trust_remote_code,
                                        attn_implementation=m.attn_implementation)
    return model, True


def merge_adapter(adapter_dir: str, output_dir: str, dtype: str = "float32") -> str:
    """Fold a LoRA adapter into its base model and save a plain HF model (+ tokenizer + template) to output_dir.
    An existing output_dir is replaced only if it is empty or an earlier merge's output."""
    from tunesmith.data.templates import TEMPLATE_FILE, load_saved_template
    from tunesmith.rundir import check_output_dir, check_replaceable, clean_stale_temps

    check_output_dir(output_dir, "output", command="merge", inputs={"adapter": adapter_dir})
    if not (Path(adapter_dir) / "adapter_config.json").exists():
        raise UserError(f"{adapter_dir}: no adapter_config.json (not a LoRA adapter directory)")
    check_replaceable(output_dir, "merge")  # a user's directory is refused before any work, and never deleted
    clean_stale_temps(Path(output_dir).absolute().parent, Path(output_dir).name)  # left by a killed merge
    model, tokenizer = load_model_and_tokenizer(adapter_dir, dtype)
    model = model.merge_and_unload()
    template = None
    if (Path(adapter_dir) / TEMPLATE_FILE).exists():  # saved again: adapters saved before chat templates get one
        template = load_saved_template(adapter_dir, tokenizer)
    kept = [Path(adapter_dir) / name for name in ("tunesmith.yaml", "README.md")]
    save_model_dir(model, tokenizer, output_dir, copy_from=kept, owner="merge", template=template)
    return output_dir


@dataclass
class MergeConfig:
    adapter: str = field("", "a LoRA adapter directory saved by tunesmith (required)")
    output: str = field("", "where the merged model goes (required)")
    dtype: str = field("float32", "float32, bfloat16, float16 or auto")

    def __post_init__(self):
        if not self.adapter or not self.output:
            raise UserError("--adapter and --output are required")


def cli(argv: list[str]) -> int:
    """tunesmith merge --adapter DIR --output DIR [--dtype float32]"""
    from tunesmith.config import parse_cli

    cfg = parse_cli(MergeConfig, argv or ["--help"], "merge", "Folds a LoRA adapter into its base model (named in "
                    "adapter_config.json) and saves a plain Hugging Face model with the tokenizer and prompt template.")
    if cfg is None:
        return 0
    import time

    from tunesmith.progress import duration

    print(f"merging {cfg.adapter} into its base model ...", flush=True)
    start = time.perf_counter()
    out = merge_adapter(cfg.adapter, cfg.output, cfg.dtype)
    print(f"merged model saved to {out} ({duration(time.perf_counter() - start)})")
    return 0
