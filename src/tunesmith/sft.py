"""Supervised fine-tuning recipe: data -> masked tokens -> transformers.Trainer (full, LoRA or QLoRA) -> saved model.

Reads top to bottom in :func:`train`. The loss is the model's own causal-LM loss normalised by the number of trained
tokens across gradient accumulation and processes (the Trainer's ``num_items_in_batch``). NEFTune noise, when
configured, is added in :meth:`TunesmithTrainer.compute_loss` for training passes only (see ``tunesmith.neftune``).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from tunesmith.config import build_config, parse_cli, save_yaml
from tunesmith.data.collate import Collator, pack
from tunesmith.data.prepare import load_examples, tokenize_examples
from tunesmith.data.templates import get_template, save_template
from tunesmith.errors import UserError
from tunesmith.neftune import NEFTuneTrainerMixin
from tunesmith.scoring import dataset_loss

log = logging.getLogger("tunesmith")


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class SFTConfig(TrainingArguments):
    """All of transformers.TrainingArguments, plus tunesmith's data, model and NEFTune keys."""

    model_name_or_path: str | None = _f(None, "Base model: a local directory or a hub id (required).")
    dataset: str | None = _f(None, "Training data: a .json/.jsonl/.csv/.parquet file or a hub dataset name.")
    dataset_format: str = _f("auto", "auto, alpaca, prompt_completion, messages, sharegpt or text.")
    dataset_split: str = _f("train", "Split to read from a hub dataset.")
    eval_dataset: str | None = _f(None, "Held-out data (same formats), scored noise-free at evaluations.")
    template: str = _f("alpaca", "alpaca, instruction_response, qa, chat, or a format string with {prompt} and "
                                 "{response}.")
    max_length: int = _f(512, "Maximum tokens per example (truncated from the end: the prompt's start is kept).")
    packing: bool = _f(False, "Pack several examples per row (no attention or position leakage between them).")
    train_on_prompt: bool = _f(False, "Also train on prompt tokens (default: responses only).")
    dtype: str = _f("float32", "float32, bfloat16, float16 or auto.")
    trust_remote_code: bool = _f(False, "Allow custom model code from the model repository.")
    use_peft: bool = _f(False, "Train a LoRA adapter instead of all weights.")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA scaling alpha.")
    lora_dropout: float = _f(0.05, "LoRA dropout.")
    lora_target_modules: list[str] = _f(None, "Modules to adapt (default all-linear).",)
    load_in_4bit: bool = _f(False, "QLoRA: load the base in 4-bit NF4 (bitsandbytes) and train a LoRA adapter.")
    neftune_noise_alpha: float | None = _f(None, "NEFTune alpha (paper: 5, 10 or 15); unset or 0 = off.")
    neftune_noise_distribution: str = _f("uniform", "uniform (the method) or gaussian (the paper's Table 6 ablation).")
    train_loss_eval_samples: int = _f(256, "Training examples scored noise-free at each evaluation (0 = none).")
    # TrainingArguments defaults that suit this recipe
    output_dir: str | None = _f(None, "Where checkpoints and the final model go (required).")
    report_to: str | list[str] | None = _f("tensorboard", "Loggers: tensorboard, wandb, none, ...")
    logging_steps: float = _f(10, "Log every N steps.")
    include_num_input_tokens_seen: str | bool = _f("non_padding", "Count non-padding tokens (for tokens/s).")
    remove_unused_columns: bool = _f(False, "Keep tunesmith's columns.", )
    padding_free: bool = _f(False, "Put each batch's examples in one row instead of padding them (same examples, same "
                                   "loss; no padding computed).")

    def __post_init__(self):
        for key in ("model_name_or_path", "dataset", "output_dir"):
            if not getattr(self, key):
                raise UserError(f"'{key}' is required")
        if self.lora_target_modules is None:
            self.lora_target_modules = ["all-linear"]
        if self.load_in_4bit:
            self.use_peft = True
        if self.neftune_noise_alpha is not None and self.neftune_noise_alpha < 0:
            raise UserError(f"neftune_noise_alpha must be >= 0, got {self.neftune_noise_alpha}")
        if self.neftune_noise_distribution not in ("uniform", "gaussian"):
            raise UserError("neftune_noise_distribution must be 'uniform' or 'gaussian'")
        if self.padding_free and self.packing:
            raise UserError("padding_free and packing exclude each other (packed rows have no padding to remove)")
        if self.max_length < 2:
            raise UserError("max_length must be at least 2")
        if isinstance(self.report_to, str) and self.report_to == "tensorboard" and not _has_tensorboard():
            self.report_to = "none"
        super().__post_init__()


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
        return True
    except ImportError:
        return False


class JsonlMetrics(TrainerCallback):
    """Appends every log event as one JSON line to ``metrics.jsonl`` (main process only)."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run restarts from its checkpoint: drop lines logged after it (and a line torn by the kill), so
        # no step appears twice. A fresh run (step 0) starts a fresh log.
        if state.is_world_process_zero and self.path.exists():
            from tunesmith.io import atomic_write_text

            keep = []
            for line in self.path.read_text(encoding="utf-8").splitlines(keepends=True):
                try:
                    step = json.loads(line).get("step")
                except json.JSONDecodeError:
                    continue
                if isinstance(step, int) and 0 < step <= state.global_step:
                    keep.append(line)
            atomic_write_text(self.path, "".join(keep))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class TunesmithTrainer(NEFTuneTrainerMixin, Trainer):
    """Trainer with per-example NEFTune noise on training passes and token-weighted, noise-free evaluation."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in self.training_inputs(model, inputs).items() if k != "token_mask"}
        # No KV cache in training: packed rows are isolated by position_ids only when no cache is in use.
        inputs["use_cache"] = False
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        sets = eval_dataset if eval_dataset is not None else self.eval_dataset
        if sets is None:
            return {}
        if not isinstance(sets, dict):
            sets = {"": sets}
        rank, world = self.args.process_index, self.args.world_size
        metrics = {}
        for name, data in sets.items():
            shard = [data[i] for i in range(rank, len(data), world)]
            batches = torch.utils.data.DataLoader(shard, batch_size=self.args.per_device_eval_batch_size,
                                                  collate_fn=self.data_collator)
            result = dataset_loss(self.model, batches, device=self.args.device)
            prefix = f"{metric_key_prefix}_{name}_" if name else f"{metric_key_prefix}_"
            metrics[prefix + "loss"] = result["loss"]
            metrics[prefix + "perplexity"] = result["perplexity"]
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        return metrics


def prepare_data(cfg: SFTConfig, tokenizer):
    """Template, tokenized train/eval sets and their summaries; raises UserError before anything is written."""
    template = get_template(cfg.template, tokenizer)
    examples = load_examples(cfg.dataset, cfg.dataset_format, cfg.dataset_split)
    train_set, summary = tokenize_examples(examples, tokenizer, template, cfg.max_length, cfg.train_on_prompt,
                                           source=cfg.dataset)
    eval_set = eval_summary = None
    if cfg.eval_dataset:
        eval_examples = load_examples(cfg.eval_dataset, cfg.dataset_format, "validation")
        eval_set, eval_summary = tokenize_examples(eval_examples, tokenizer, template, cfg.max_length,
                                                   cfg.train_on_prompt, source=cfg.eval_dataset)
    return template, train_set, summary, eval_set, eval_summary


def build_model(cfg: SFTConfig, tokenizer):
    from tunesmith.models import load_model_and_tokenizer, wrap_lora

    model, _ = load_model_and_tokenizer(cfg.model_name_or_path, cfg.dtype, cfg.load_in_4bit, cfg.trust_remote_code)
    if cfg.use_peft:
        model = wrap_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules,
                          quantized=cfg.load_in_4bit, gradient_checkpointing=cfg.gradient_checkpointing)
    return model


def write_model_card(cfg: SFTConfig, out: Path, metrics: dict) -> None:
    from tunesmith.io import atomic_write_text

    method = "QLoRA" if cfg.load_in_4bit else "LoRA" if cfg.use_peft else "full fine-tuning"
    neft = (f"NEFTune alpha {cfg.neftune_noise_alpha} ({cfg.neftune_noise_distribution}, per-example length)"
            if cfg.neftune_noise_alpha else "no NEFTune")
    lines = [f"# {out.name}", "", f"Fine-tuned with tunesmith from `{cfg.model_name_or_path}` on `{cfg.dataset}` "
             f"({method}, {neft}).", "", f"- prompt template: `{cfg.template}` (saved in tunesmith_template.json)",
             f"- epochs {cfg.num_train_epochs}, learning rate {cfg.learning_rate}, max length {cfg.max_length}, "
             f"packing {cfg.packing}, seed {cfg.seed}", "", "## Final metrics", ""]
    lines += [f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in sorted(metrics.items())]
    atomic_write_text(out / "README.md", "\n".join(lines) + "\n")


def train(config, callbacks: list | None = None) -> str:
    """Run SFT from an SFTConfig or a dict of config keys. Returns the output directory.

    ``callbacks``: extra ``transformers.TrainerCallback`` objects (progress hooks, early stopping, ...).
    ``resume_from_checkpoint``: a checkpoint directory, or true / last for the newest one in ``output_dir``.
    """
    from transformers import set_seed

    from tunesmith.models import ensure_pad_token, load_tokenizer

    cfg = config if isinstance(config, SFTConfig) else build_config(SFTConfig, dict(config), "config")
    out = Path(cfg.output_dir)
    if (out / "tunesmith.yaml").exists() and not cfg.resume_from_checkpoint and not cfg.overwrite_output_dir:
        raise UserError(f"{out}: holds a finished run; choose another output_dir or set overwrite_output_dir")
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.trust_remote_code)
    ensure_pad_token(tokenizer)
    template, train_set, summary, eval_set, eval_summary = prepare_data(cfg, tokenizer)
    if cfg.process_index == 0:
        for line in summary.lines() + (eval_summary.lines() if eval_summary else []):
            log.warning(line)
    rows = pack(train_set, cfg.max_length) if cfg.packing else train_set
    model = build_model(cfg, tokenizer)

    evals = {}
    if cfg.train_loss_eval_samples:
        g = torch.Generator().manual_seed(cfg.seed)
        idx = torch.randperm(summary.kept, generator=g)[: cfg.train_loss_eval_samples].tolist()
        evals["train"] = [train_set[i] for i in idx]  # scored one by one, even when training rows are packed
    if eval_set:
        evals["eval"] = eval_set
    trainer = TunesmithTrainer(
        model=model, args=cfg, train_dataset=rows, eval_dataset=evals or None,
        data_collator=Collator(tokenizer.pad_token_id, cfg.padding_free), processing_class=tokenizer,
        neftune_alpha=cfg.neftune_noise_alpha, neftune_distribution=cfg.neftune_noise_distribution)
    for callback in [JsonlMetrics(out / "metrics.jsonl")] + list(callbacks or []):
        trainer.add_callback(callback)
    resume = cfg.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = True
    trainer.train(resume_from_checkpoint=resume)
    metrics = trainer.evaluate() if evals else {}

    if trainer.is_world_process_zero():
        trainer.save_model(str(out))
        tokenizer.save_pretrained(out)
        save_template(template, out)
        (out / "training_args.bin").unlink(missing_ok=True)  # a pickle; the resolved config is in tunesmith.yaml
        write_model_card(cfg, out, metrics)
        save_yaml(cfg, out / "tunesmith.yaml")  # written last: its presence marks a finished run
    if cfg.world_size > 1:
        torch.distributed.barrier()
    return str(out)


def cli(argv: list[str]) -> int:
    cfg = parse_cli(SFTConfig, argv, "sft", "Supervised fine-tuning of a causal LM (full, LoRA or QLoRA), with "
                    "responses-only loss, optional packing and per-example NEFTune.")
    if cfg is None:
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = train(cfg)
    print(f"model saved to {out}")
    return 0
