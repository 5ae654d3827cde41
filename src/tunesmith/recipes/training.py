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
        if isinstance(self.report_to, str) and self.report_to == "tensorboard" and not _has_tensorboard():
            self.report_to = "none"
        check_training_values(self)
        super().__post_init__()


def check_training_values(args) -> None:
    """One-line errors for training settings that would crash later, train nothing, or train to NaN and call the
    run finished: every numeric TrainingArguments key finite and in range, a scheduler's keyword arguments, and the
    loggers of ``report_to`` installed."""
    from tunesmith import checks

    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        checks.at_least(key, getattr(args, key), 1)
    checks.positive("learning_rate", args.learning_rate)
    checks.number("learning_rate", args.learning_rate, high=10, why="fine-tuning rates are around 1e-6 .. 1e-3")
    if args.max_steps == 0 or args.max_steps < -1:
        raise UserError(f"field 'max_steps' must be a positive number of optimizer steps (or -1: train "
                        f"num_train_epochs), got {args.max_steps}")
    checks.positive("num_train_epochs", args.num_train_epochs)
    checks.non_negative("weight_decay", args.weight_decay)
    checks.non_negative("max_grad_norm", args.max_grad_norm, why="0 turns clipping off")
    checks.fraction("adam_beta1", args.adam_beta1)
    checks.fraction("adam_beta2", args.adam_beta2)
    checks.positive("adam_epsilon", args.adam_epsilon)
    checks.fraction("label_smoothing_factor", args.label_smoothing_factor)
    checks.non_negative("warmup_steps", args.warmup_steps, why="a number of steps, or a fraction of them below 1")
    checks.seed("seed", args.seed)
    checks.seed("data_seed", args.data_seed, optional=True)
    for key in ("logging_steps", "save_steps"):
        checks.positive(key, getattr(args, key), why="every N steps, or a fraction of the run below 1")
    checks.positive("eval_steps", args.eval_steps, optional=True)
    checks.non_negative("eval_delay", args.eval_delay)
    for key in ("save_total_limit", "eval_accumulation_steps", "torch_empty_cache_steps"):
        checks.at_least(key, getattr(args, key), 1, optional=True)
    checks.non_negative("dataloader_num_workers", args.dataloader_num_workers)
    checks.at_least("dataloader_prefetch_factor", args.dataloader_prefetch_factor, 1, optional=True)
    checks.positive("ddp_timeout", args.ddp_timeout)
    check_scheduler(args)
    check_report_to(args.report_to)


def check_scheduler(args) -> None:
    """Build the learning-rate schedule on a throwaway optimizer, so an unknown ``lr_scheduler_kwargs`` key (or a
    schedule that needs one) is a one-line error now, not a traceback after the model and data are loaded."""
    import torch
    from transformers import get_scheduler

    kwargs = args.lr_scheduler_kwargs or {}
    if isinstance(kwargs, str):  # TrainingArguments parses a JSON string itself
        import json

        try:
            kwargs = json.loads(kwargs) if kwargs.strip() else {}
        except ValueError:
            raise UserError(f"field 'lr_scheduler_kwargs': not a mapping or JSON object: {kwargs!r}") from None
    if not isinstance(kwargs, dict):
        raise UserError(f"field 'lr_scheduler_kwargs' must be a mapping, got {kwargs!r}")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    try:
        get_scheduler(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type), optimizer,
                      num_warmup_steps=1, num_training_steps=10, scheduler_specific_kwargs=dict(kwargs))
    except (TypeError, ValueError, KeyError) as e:
        from tunesmith.errors import first_line

        raise UserError(f"field 'lr_scheduler_kwargs' {dict(kwargs)} does not fit lr_scheduler_type "
                        f"'{getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type)}': {first_line(e)}") \
            from None


# report_to name -> the module(s) it needs (any one of them); transformers' own list, without importing its
# integrations module (slow: it imports every integration's helpers)
REPORTERS = {"azure_ml": ("azureml",), "comet_ml": ("comet_ml",), "dagshub": ("dagshub",), "dvclive": ("dvclive",),
             "mlflow": ("mlflow",), "neptune": ("neptune",), "tensorboard": ("tensorboard", "tensorboardX"),
             "wandb": ("wandb",), "codecarbon": ("codecarbon",), "clearml": ("clearml",), "swanlab": ("swanlab",),
             "trackio": ("trackio",), "kubeflow": ("kubeflow",), "flyte": ("flytekit",)}


def check_report_to(report_to) -> None:
    """Each logger of ``report_to`` must be known and installed (transformers fails with a traceback at the
    Trainer)."""
    import importlib.util

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        if name in ("none", "all"):
            continue
        if name not in REPORTERS:
            raise UserError(f"field 'report_to': unknown logger {name!r} (choose none or "
                            f"{', '.join(sorted(REPORTERS))})")
        if not any(importlib.util.find_spec(m) for m in REPORTERS[name]):
            raise UserError(f"field 'report_to': {name} is not installed here (pip install {REPORTERS[name][0]}), "
                            f"or set report_to: none")


# TrainingArguments keys that change what training computes (logging, saving, evaluation and paths do not).
# transformers 5 folded group_by_length into train_sampling_strategy; tests/test_library_contracts.py checks that
# every key here is still a TrainingArguments field.
TRAJECTORY_KEYS = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                   "gradient_accumulation_steps", "seed", "data_seed", "optim", "weight_decay", "lr_scheduler_type",
                   "warmup_steps", "max_grad_norm", "adam_beta1", "adam_beta2", "adam_epsilon", "bf16", "fp16",
                   "train_sampling_strategy", "label_smoothing_factor")


def run_fingerprint(cfg, ignore=("eval_dataset", "test_dataset", "train_loss_eval_samples", "compare_sentences",
                                 "trust_remote_code"), **extras):
    """The fingerprint of a recipe config (:class:`tunesmith.config.Config`), read part by part: every key of its
    non-training parts but ``ignore`` (keys that do not change the trained weights), the training keys of
    :data:`TRAJECTORY_KEYS`, and the named ``extras`` (what the config does not hold: a digest of the tokenized
    data, the world size). A resume whose fingerprint differs from its checkpoint's is refused."""
    import dataclasses

    from tunesmith.rundir import Fingerprint

    values = {}
    for name, part in type(cfg).PARTS:
        values_of = getattr(cfg, name)
        for f in dataclasses.fields(part):
            if not f.init or f.name in values or f.name in ignore:
                continue  # a key belongs to the first part that declares it
            if name == "training" and f.name not in TRAJECTORY_KEYS:
                continue
            values[f.name] = getattr(values_of, f.name)
    return Fingerprint.of(values | extras)


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
