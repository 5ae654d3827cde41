"""`tunesmith spin` options and the run's fingerprint (the keys that determine its results)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainingArguments

from tunesmith.errors import UserError
from tunesmith.recipes.sft.config import SFTConfig


def _f(default, help: str):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class SPINConfig(SFTConfig):
    """SFTConfig (data, model, LoRA, NEFTune, TrainingArguments) plus SPIN's iteration and generation keys.

    ``beta``, ``learning_rate`` and ``num_train_epochs`` take one value or one per iteration. Defaults follow the
    paper's recipe (RMSProp, no weight decay, linear schedule, warmup 0.1, beta 0.1, 2 epochs, mixing t and t-1).
    """

    num_iterations: int = _f(1, "Number of SPIN iterations (the paper: 4).")
    beta: list[float] = _f([0.1], "The paper's lambda, one value or one per iteration (paper: 0.1, 5.0 at the last).")
    learning_rate: list[float] = _f([5e-7], "One value or one per iteration (paper: 5e-7, 5e-7, 1e-7, 1e-7).")
    num_train_epochs: list[float] = _f([2.0], "Epochs per iteration: one value or one per iteration.")
    loss_type: str = _f("sigmoid", "sigmoid (the paper's logistic loss) or hinge (max(0, 1 - t)).")
    mix_previous_iteration: bool = _f(True, "Train iteration t on the synthetic data of t and t-1 (paper) or t only.")
    max_new_tokens: int = _f(256, "Generation budget per answer; answers cut there are counted and reported.")
    do_sample: bool = _f(False, "Sample the synthetic answers (default greedy).")
    temperature: float = _f(1.0, "Sampling temperature.")
    top_p: float = _f(1.0, "Nucleus sampling.")
    repetition_penalty: float = _f(1.0, "Repetition penalty at generation.")
    generation_batch_size: int = _f(32, "Prompts per generation batch.")
    shard_size: int = _f(256, "Prompts (generation) or pairs (reference scoring) per shard on disk.")
    template: str | None = _f(None, "Prompt template; default: the one the SFT model was saved with.")
    # TrainingArguments defaults that follow the paper
    optim: str = _f("rmsprop", "Optimizer (paper: RMSProp).")
    weight_decay: float = _f(0.0, "Weight decay (paper: none).")
    lr_scheduler_type: str = _f("linear", "Learning-rate schedule (paper: linear).")
    warmup_steps: float = _f(0.1, "Warmup steps, or a fraction of the iteration's steps below 1 (paper: 0.1).")
    save_strategy: str = _f("steps", "Trainer checkpoints within an iteration (a killed run resumes from them).")
    save_steps: float = _f(200, "Checkpoint every N steps.")
    save_total_limit: int | None = _f(1, "Trainer checkpoints kept per iteration.")
    train_loss_eval_samples: int = _f(0, "Unused by SPIN.")

    def __post_init__(self):
        n = self.num_iterations
        if n < 1:
            raise UserError(f"num_iterations must be at least 1, got {n}")
        for key in ("beta", "learning_rate", "num_train_epochs"):
            values = getattr(self, key)
            values = list(values) if isinstance(values, (list, tuple)) else [values]
            if len(values) == 1:
                values = values * n
            if len(values) != n:
                raise UserError(f"field '{key}' has {len(values)} values but num_iterations is {n} (give one value "
                                f"or one per iteration)")
            bad = [v for v in values if not v > 0]
            if bad:
                raise UserError(f"field '{key}' must be > 0, got {bad[0]}")
            setattr(self, key, [float(v) for v in values])
        if self.loss_type not in ("sigmoid", "hinge"):
            raise UserError(f"field 'loss_type' must be sigmoid or hinge, got {self.loss_type!r}")
        for key in ("max_new_tokens", "generation_batch_size", "shard_size"):
            if getattr(self, key) < 1:
                raise UserError(f"field '{key}' must be at least 1, got {getattr(self, key)}")
        if not self.temperature > 0 or not 0 < self.top_p <= 1 or not self.repetition_penalty > 0:
            raise UserError("generation settings: need temperature > 0, 0 < top_p <= 1, repetition_penalty > 0")
        if self.packing:
            raise UserError("field 'packing' is not supported by SPIN (pairs are scored row by row)")
        if self.train_on_prompt:
            raise UserError("field 'train_on_prompt' is not supported by SPIN (log-probs are over answer tokens)")
        if self.dataset_format == "text":
            raise UserError("dataset_format 'text' has no prompts and real answers; SPIN needs prompt/answer data")
        super().__post_init__()

    def iteration_args(self, t: int, output_dir: Path) -> TrainingArguments:
        """Plain TrainingArguments for iteration ``t``: this config with the iteration's scalar values."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
        values.update(output_dir=str(output_dir), learning_rate=self.learning_rate[t],
                      num_train_epochs=self.num_train_epochs[t], eval_strategy="no", load_best_model_at_end=False,
                      resume_from_checkpoint=None)
        return TrainingArguments(**values)


# Keys that determine a run's results: a rerun with other values is a different run.
FINGERPRINT_KEYS = (
    "model_name_or_path", "dataset", "dataset_format", "dataset_split", "template", "max_length", "dtype",
    "use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "load_in_4bit",
    "neftune_noise_alpha", "neftune_noise_distribution", "num_iterations", "beta", "learning_rate",
    "num_train_epochs", "loss_type", "mix_previous_iteration", "max_new_tokens", "do_sample", "temperature", "top_p",
    "repetition_penalty", "shard_size", "seed", "per_device_train_batch_size", "gradient_accumulation_steps",
    "optim", "weight_decay", "lr_scheduler_type", "warmup_steps", "max_grad_norm", "max_steps", "adam_beta1",
    "adam_beta2", "adam_epsilon",
)


def fingerprint_values(cfg) -> dict:
    out = {}
    for key in FINGERPRINT_KEYS:
        v = getattr(cfg, key)
        out[key] = v.value if hasattr(v, "value") else v
    return out


def fingerprint(values: dict) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]

