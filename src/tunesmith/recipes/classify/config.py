"""`tunesmith classify` options; the defaults are the fine-tuning primer's settings."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from tunesmith.errors import UserError

# The article's five sentences (its "before / after" table).


ARTICLE_SENTENCES = ["It was good.", "Not a fan, don't recommend.", "Better than the first one.",
                     "This is not worth watching even once.", "This one is a pass."]


def _h(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class ClassifyConfig(TrainingArguments):
    """``tunesmith classify`` options. Every ``transformers.TrainingArguments`` field works too; the defaults below are
    the article's settings (lr 1e-3, batch 4, 10 epochs, weight decay 0.01, LoRA r=4 / alpha 32 / dropout 0.01 on the
    query projection), made CPU-friendly (float32, no fused optimizer, no reporting)."""

    model_name_or_path: str = _h("model directory, hub id, or pkg:PACKAGE/path (required)", default="")
    train_file: str = _h("training data: .json/.jsonl/.csv/.parquet file, a directory, or an HF dataset", default="")
    validation_file: str | None = _h("evaluated every epoch; picks the best checkpoint (none: no evaluation)",
                                     default=None)
    test_file: str | None = _h("held-out split scored before and after training", default=None)
    text_column: str = _h("column holding the text", default="text")
    label_column: str = _h("column holding the label (multi_label: a list of labels)", default="label")
    labels: list[str] | None = _h(
        "label names in id order; default: the distinct labels of the training data, sorted. A data value matches a "
        "name; an integer matching no name is read as an index into this list", default=None)
    multi_label: bool = _h("each text has zero or more labels (sigmoid + BCE)", default=False)
    threshold: float = _h("multi_label: a label is predicted when its probability >= threshold", default=0.5)
    max_length: int = _h("truncate texts to this many tokens", default=256)
    use_lora: bool = _h("LoRA adapters (true) or full fine-tuning (false)", default=True)
    lora_r: int = _h("LoRA rank", default=4)
    lora_alpha: float = _h("LoRA scaling numerator (scale = alpha / r)", default=32)
    lora_dropout: float = _h("dropout on the LoRA input", default=0.01)
    lora_target_modules: list[str] | None = _h(
        "module names that get adapters; default: the attention query projection (query / q_lin / q_proj)",
        default=None)
    modules_to_save: list[str] | None = _h(
        "extra modules trained fully under LoRA (the new head and any module missing from the checkpoint always are)",
        default=None)
    neftune_noise_distribution: str = _h("NEFTune noise: uniform (the paper) or gaussian", default="uniform")
    compare_sentences: list[str] | None = _h(
        "sentences whose predictions are printed before and after training (default: the article's five)",
        default_factory=lambda: list(ARTICLE_SENTENCES))
    trust_remote_code: bool = _h("allow model code from the model directory / hub (off: never runs foreign code)",
                                 default=False)

    # TrainingArguments defaults changed to the article's settings and a CPU-friendly setup.
    output_dir: str | None = _h("where checkpoints and the final model go", default="outputs/classify")
    learning_rate: float = 1e-3
    per_device_train_batch_size: int = 4
    per_device_eval_batch_size: int = 32
    num_train_epochs: float = 10
    weight_decay: float = 0.01
    eval_strategy: str = "epoch"
    save_strategy: str = "epoch"
    logging_strategy: str = "epoch"
    load_best_model_at_end: bool = True
    metric_for_best_model: str | None = "accuracy"
    save_total_limit: int | None = 1
    report_to: str | list[str] | None = "none"
    optim: str = "adamw_torch"
    bf16: bool = False
    fp16: bool = False
    dataloader_pin_memory: bool = False
    disable_tqdm: bool = True

    def __post_init__(self):
        if not self.model_name_or_path:
            raise UserError("field 'model_name_or_path' is required")
        if not self.train_file:
            raise UserError("field 'train_file' is required")
        if self.neftune_noise_distribution not in ("uniform", "gaussian"):
            raise UserError(f"field 'neftune_noise_distribution': must be uniform or gaussian, "
                            f"got {self.neftune_noise_distribution!r}")
        if self.neftune_noise_alpha is not None and self.neftune_noise_alpha <= 0:
            raise UserError(f"field 'neftune_noise_alpha': must be > 0, got {self.neftune_noise_alpha}")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise UserError(f"field 'labels': names must be distinct, got {self.labels}")
        if not 0 < self.threshold < 1:
            raise UserError(f"field 'threshold': must be between 0 and 1, got {self.threshold}")
        for name in ("eval_strategy", "save_strategy", "logging_strategy"):
            if getattr(self, name) in (False, "False", "false"):  # YAML reads a bare `no` as false
                setattr(self, name, "no")
        if self.label_names is None:
            self.label_names = ["labels"]
        if not self.validation_file:  # nothing to evaluate: no per-epoch evaluation, no best-checkpoint choice
            self.eval_strategy = "no"
            self.load_best_model_at_end = False
        if self.metric_for_best_model and self.metric_for_best_model.startswith("eval_"):
            self.metric_for_best_model = self.metric_for_best_model[len("eval_"):]
        super().__post_init__()


