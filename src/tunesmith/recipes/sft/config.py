"""`tunesmith sft` options: TrainingArguments plus the data, model, LoRA and NEFTune keys."""
from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from tunesmith.errors import UserError

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

