"""`tunesmith spin` options.

SPIN's own part holds the values that may change per iteration (``beta``, ``learning_rate``, ``num_train_epochs``: one
value or one per iteration) and builds each iteration's ``TrainingArguments`` from the training part.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainingArguments

from tunesmith.config import Config, DataArgs, LoraArgs, ModelArgs, NEFTuneArgs, field
from tunesmith.errors import UserError
from tunesmith.preference.config import LOSS_HELP, check_loss_keys
from tunesmith.recipes.training import TrainingPart


@dataclass
class SPINArgs:
    """SPIN (iterations and generation; defaults follow the paper)"""

    num_iterations: int = field(1, "Number of SPIN iterations (the paper: 4).")
    beta: list[float] = field([0.1], "The paper's lambda, one value or one per iteration (paper: 0.1, 5.0 at the "
                                     "last).")
    learning_rate: list[float] = field([5e-7], "One value or one per iteration (paper: 5e-7, 5e-7, 1e-7, 1e-7).")
    num_train_epochs: list[float] = field([2.0], "Epochs per iteration: one value or one per iteration.")
    loss_type: str = field("sigmoid", "sigmoid (the paper's logistic loss), hinge (max(0, 1 - t)); also ipo, dpop, "
                                      "simpo, orpo (the preference engine's losses, as in tunesmith dpo).")
    label_smoothing: float = field(0.0, LOSS_HELP["label_smoothing"])
    dpop_lambda: float = field(50.0, LOSS_HELP["dpop_lambda"])
    simpo_gamma: float = field(0.5, LOSS_HELP["simpo_gamma"])
    mix_previous_iteration: bool = field(True, "Train iteration t on the synthetic data of t and t-1 (paper) or t "
                                               "only.")
    max_new_tokens: int = field(256, "Generation budget per answer (the authors' 256); answers cut there are counted "
                                     "and reported.")
    do_sample: bool = field(True, "Sample the synthetic answers as the authors' generator does (false: greedy).")
    temperature: float = field(0.8, "Sampling temperature (the authors' generator: 0.8).")
    top_p: float = field(0.95, "Nucleus sampling (the authors' generator: 0.95).")
    repetition_penalty: float = field(1.0, "Repetition penalty at generation.")
    generation_batch_size: int = field(32, "Prompts per generation batch.")
    generation_backend: str = field("hf", "hf (transformers' generate) or vllm (GPU; the same prompt ids, a seed per "
                                          "prompt derived from its shard's seed).")
    shard_size: int = field(256, "Prompts (generation) or pairs (reference scoring) per shard on disk.")

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
        check_loss_keys(self, self.beta)
        for key in ("max_new_tokens", "generation_batch_size", "shard_size"):
            if getattr(self, key) < 1:
                raise UserError(f"field '{key}' must be at least 1, got {getattr(self, key)}")
        if self.generation_backend not in ("hf", "vllm"):
            raise UserError(f"field 'generation_backend' must be hf or vllm, got {self.generation_backend!r}")
        if not self.temperature > 0 or not 0 < self.top_p <= 1 or not self.repetition_penalty > 0:
            raise UserError("generation settings: need temperature > 0, 0 < top_p <= 1, repetition_penalty > 0")


@dataclass
class SPINDataArgs(DataArgs):
    """Data"""

    template: str | None = field(None, "Prompt template; default: the one the SFT model was saved with.")

    def __post_init__(self):
        for key, why in (("packing", "a pair's two answers are rows of one batch; padding_free is the "
                                     "padding-free layout for pairs"),
                         ("train_on_prompt", "log-probs are over answer tokens")):
            if getattr(self, key):
                raise UserError(f"field '{key}' is not supported by SPIN ({why})")
        if self.dataset_format == "text":
            raise UserError("dataset_format 'text' has no prompts and real answers; SPIN needs prompt/answer data")
        super().__post_init__()


@dataclass
class SPINTrainingPart(TrainingPart):
    """Training (every transformers.TrainingArguments key; learning_rate and num_train_epochs are SPIN's, above)"""

    optim: str = field("rmsprop", "Optimizer (paper: RMSProp).")
    weight_decay: float = field(0.0, "Weight decay (paper: none).")
    lr_scheduler_type: str = field("linear", "Learning-rate schedule (paper: linear).")
    warmup_steps: float = field(0.1, "Warmup steps, or a fraction of the iteration's steps below 1 (paper: 0.1).")
    save_strategy: str = field("steps", "Trainer checkpoints within an iteration (a killed run resumes from them).")
    save_steps: float = field(200, "Checkpoint every N steps.")
    save_total_limit: int | None = field(1, "Trainer checkpoints kept per iteration.")


class SPINConfig(Config):
    """Every key of the parts below, flat. The SFT model's data keys and LoRA / NEFTune keys mean what they mean in
    ``tunesmith sft``."""

    PARTS = (("spin", SPINArgs), ("model", ModelArgs), ("data", SPINDataArgs), ("lora", LoraArgs),
             ("neftune", NEFTuneArgs), ("training", SPINTrainingPart))

    def validate(self) -> None:
        if self.model.load_in_4bit:
            self.lora.use_peft = True

    def iteration_args(self, t: int, output_dir: Path) -> TrainingArguments:
        """Plain TrainingArguments for iteration ``t``: the training part with the iteration's scalar values."""
        values = {f.name: getattr(self.training, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
        values.update(output_dir=str(output_dir), learning_rate=self.spin.learning_rate[t],
                      num_train_epochs=self.spin.num_train_epochs[t], eval_strategy="no", load_best_model_at_end=False,
                      resume_from_checkpoint=None)
        return TrainingArguments(**values)
