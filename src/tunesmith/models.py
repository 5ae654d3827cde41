"""Model I/O every recipe shares: loading models and tokenizers (local directory or hub id) with one pad-token rule,
LoRA / QLoRA wrapping, one atomic save of a model directory, train/eval mode switching, and ``tunesmith merge``."""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunesmith.errors import UserError, first_line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PAD_TOKEN = "<|pad|>"


def unwrap_distributed(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / DeepSpeed wrappers (PEFT wrappers are kept: they forward to their base)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def resolve_dtype(name: str):
    if name == "auto":
        return "auto"
    if name not in DTYPES:
        raise UserError(f"unknown dtype '{name}' (choose float32, bfloat16, float16 or auto)")
    return DTYPES[name]


def _check_source(path: str) -> None:
    p = Path(path)
    looks_local = p.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local and not p.is_dir():
        raise UserError(f"{path}: model directory not found")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    _check_source(path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{path}: cannot load tokenizer ({first_line(e)})") from None
    return tok


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
        resize_embeddings(model, len(tokenizer))
    return True


def resize_embeddings(model, vocab_size: int) -> None:
    if model.get_input_embeddings().weight.shape[0] < vocab_size:
        model.resize_token_embeddings(vocab_size, mean_resizing=True)
    model.config.pad_token_id = None  # set by the caller from the tokenizer


def load_model_and_tokenizer(path: str, dtype: str = "float32", load_in_4bit: bool = False,
                             trust_remote_code: bool = False, model_class=None):
    """Load a causal LM (or ``model_class``) and its tokenizer; safetensors only; adds a dedicated pad token.

    ``path`` may also be a LoRA adapter directory saved by tunesmith: its base is loaded (resized to the adapter's
    tokenizer) and the adapter applied, ready for inference or further training.
    """
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(path, trust_remote_code)
    adapter_cfg = Path(path) / "adapter_config.json"
    base = json.loads(adapter_cfg.read_text())["base_model_name_or_path"] if adapter_cfg.exists() else path
    if adapter_cfg.exists():
        _check_source(base)
    kwargs = dict(dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code, use_safetensors=True)
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        compute = DTYPES.get(dtype, torch.float32) if dtype != "auto" else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute)
    cls = model_class or AutoModelForCausalLM
    try:
        model = cls.from_pretrained(base, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"{base}: cannot load model ({first_line(e)})") from None
    ensure_pad_token(tokenizer, model)
    if adapter_cfg.exists():
        from peft import PeftModel

        resize_embeddings(model, len(tokenizer))
        model = PeftModel.from_pretrained(model, path)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


@contextmanager
def eval_mode(model):
    """``with eval_mode(model):`` runs the block with the model in eval mode and restores its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def save_model_dir(model, tokenizer, path, write=None, copy_from=(), replace: bool = False) -> Path:
    """Save ``model`` (safetensors) and ``tokenizer`` to the directory ``path`` so that a crash never leaves something
    that looks like a complete model: everything is written into a temporary directory first.

    ``write(tmp)`` may add files (prompt template, config); ``copy_from`` lists files copied in when they exist. A new
    ``path`` is then renamed into place in one step (``replace=True``: an existing one is removed first, once the new
    one is complete). An existing ``path`` (a run's output directory, which also holds checkpoints and logs) receives
    the files one by one, ``config.json`` (what makes it loadable) last.
    """
    path = Path(path)
    into = path.is_dir() and not replace
    tmp = path / ".model.partial" if into else path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for src in map(Path, copy_from):
        if src.exists():
            shutil.copy(src, tmp / src.name)
    if write is not None:
        write(tmp)
    if not into:
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        return path
    for f in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):
        if (path / f.name).is_dir():
            shutil.rmtree(path / f.name)
        os.replace(f, path / f.name)
    tmp.rmdir()
    return path


def wrap_lora(model, r: int, alpha: int, dropout: float, target_modules, task_type: str = "CAUSAL_LM",
              quantized: bool = False, gradient_checkpointing: bool = False, modules_to_save=None):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    targets = target_modules
    if isinstance(targets, (list, tuple)) and len(targets) == 1 and targets[0] == "all-linear":
        targets = "all-linear"
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type=task_type,
                        modules_to_save=modules_to_save)
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise UserError(f"lora_target_modules {target_modules}: {first_line(e)}") from None


def merge_adapter(adapter_dir: str, output_dir: str, dtype: str = "float32") -> str:
    """Fold a LoRA adapter into its base model and save a plain HF model (+ tokenizer + template) to output_dir."""
    if not (Path(adapter_dir) / "adapter_config.json").exists():
        raise UserError(f"{adapter_dir}: no adapter_config.json (not a LoRA adapter directory)")
    model, tokenizer = load_model_and_tokenizer(adapter_dir, dtype)
    model = model.merge_and_unload()
    kept = [Path(adapter_dir) / name for name in ("tunesmith_template.json", "tunesmith.yaml", "README.md")]
    save_model_dir(model, tokenizer, output_dir, copy_from=kept, replace=True)
    return output_dir


@dataclass
class MergeConfig:
    adapter: str = field(default="", metadata={"help": "a LoRA adapter directory saved by tunesmith (required)"})
    output: str = field(default="", metadata={"help": "where the merged model goes (required)"})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16, float16 or auto"})

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
    out = merge_adapter(cfg.adapter, cfg.output, cfg.dtype)
    print(f"merged model saved to {out}")
    return 0
