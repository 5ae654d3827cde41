"""Training plumbing the recipes share: the training part of the causal-LM recipes (sft, spin), that is
``transformers.TrainingArguments`` with tunesmith's defaults (every key works; recipes hand it to the Trainer as its
``args``), the checks every training part runs, and a run's fingerprint (checkpoints and the run directory itself
are handled by :mod:`tunesmith.rundir`)."""
from __future__ import annotations

from dataclasses import dataclass

from transformers import TrainingArguments

from tunesmith.config import field
from tunesmith.errors import UserError


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
        return True
    except ImportError:
        return False


@dataclass
class TrainingPart(TrainingArguments):
    """Training (every transformers.TrainingArguments key)"""

    output_dir: str | None = field(None, "Where checkpoints and the final model go (required).")
    report_to: str | list[str] | None = field("tensorboard", "Loggers: tensorboard, wandb, none, ...")
    logging_steps: float = field(10, "Log every N steps.")
    include_num_input_tokens_seen: str | bool = field("non_padding", "Count non-padding tokens (for tokens/s).")
    remove_unused_columns: bool = field(False, "Keep tunesmith's columns.")
    ddp_find_unused_parameters: bool | None = field(False, "DDP: look for parameters a step leaves unused (true for "
                                                           "mixture-of-experts models; false, the default, skips that "
                                                           "graph walk and its notice).")

    def __post_init__(self):
        if not self.output_dir:
            raise UserError("field 'output_dir' is required")
        check_training_values(self)
        if isinstance(self.report_to, str) and self.report_to == "tensorboard" and not _has_tensorboard():
            self.report_to = "none"
        super().__post_init__()


def check_training_values(args) -> None:
    """One-line errors for training settings that would crash later or train nothing and call the run finished."""
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(args, key) < 1:
            raise UserError(f"field '{key}' must be at least 1, got {getattr(args, key)}")
    if not args.learning_rate > 0:
        raise UserError(f"field 'learning_rate' must be > 0, got {args.learning_rate}")
    if args.max_steps == 0 or args.max_steps < -1:
        raise UserError(f"field 'max_steps' must be a positive number of optimizer steps (or -1: train "
                        f"num_train_epochs), got {args.max_steps}")
    if args.max_steps == -1 and not args.num_train_epochs > 0:
        raise UserError(f"field 'num_train_epochs' must be > 0, got {args.num_train_epochs}")


# TrainingArguments keys that change what training computes (logging, saving, evaluation and paths do not).
TRAJECTORY_KEYS = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                   "gradient_accumulation_steps", "seed", "data_seed", "optim", "weight_decay", "lr_scheduler_type",
                   "warmup_steps", "max_grad_norm", "adam_beta1", "adam_beta2", "adam_epsilon", "bf16", "fp16",
                   "train_sampling_strategy", "group_by_length", "label_smoothing_factor")


def run_fingerprint(cfg, ignore=("eval_dataset", "test_dataset", "train_loss_eval_samples", "compare_sentences",
                                 "trust_remote_code")):
    """The fingerprint of a recipe config (:class:`tunesmith.config.Config`): every key of its non-training parts
    but ``ignore`` (keys that do not change the trained weights), plus the training keys of :data:`TRAJECTORY_KEYS`.
    A resume whose fingerprint differs from its checkpoint's is refused."""
    from tunesmith.rundir import Fingerprint

    keys = [k for k, part in type(cfg).owners().items() if part != "training" and k not in ignore]
    keys += [k for k in TRAJECTORY_KEYS if hasattr(cfg.training, k) and k not in keys]
    return Fingerprint.of_config(cfg, keys)


def check_max_length(cfg) -> None:
    """``max_length`` beyond the positions the model has is a one-line error before anything is loaded (not a crash,
    or silent garbage, in the middle of training). Reads only the model's config (the base's, for an adapter)."""
    import json
    from pathlib import Path

    from transformers import AutoConfig

    source = cfg.model.model_name_or_path
    adapter = Path(source) / "adapter_config.json"
    try:
        if adapter.is_file():
            source = json.loads(adapter.read_text(encoding="utf-8"))["base_model_name_or_path"]
        config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code)
    except Exception:  # an unreadable model is reported, with its reason, where it is loaded
        return
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    if isinstance(limit, int) and cfg.data.max_length > limit:
        raise UserError(f"field 'max_length': {cfg.data.max_length} is more than the {limit} positions of "
                        f"{cfg.model.model_name_or_path} (max_position_embeddings)")
