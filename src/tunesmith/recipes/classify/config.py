"""`tunesmith classify` options: the shared model, LoRA and NEFTune parts (with the article's LoRA defaults), the
classification data part, and TrainingArguments with the article's settings (lr 1e-3, batch 4, 10 epochs, weight
decay 0.01, LoRA r=4 / alpha 32 / dropout 0.01 on the query projection), made CPU-friendly (float32, no fused
optimizer, no reporting)."""
from __future__ import annotations

from dataclasses import dataclass

from transformers import TrainingArguments

from tunesmith.config import Config, LoraArgs, ModelArgs, NEFTuneArgs, check_lora_values, field
from tunesmith.errors import UserError
from tunesmith.recipes.training import check_training_values

# The article's five sentences (its "before / after" table).
ARTICLE_SENTENCES = ["It was good.", "Not a fan, don't recommend.", "Better than the first one.",
                     "This is not worth watching even once.", "This one is a pass."]


@dataclass
class ClassifyArgs:
    """Classify"""

    compare_sentences: list[str] | None = field(
        ARTICLE_SENTENCES, "sentences whose predictions are printed before and after training (default: the article's "
                           "five)")


@dataclass
class ClassifyDataArgs:
    """Data"""

    dataset: str | list | None = field(None, "training data: .json/.jsonl/.csv/.parquet file, a directory, a pipe, "
                                             "pkg:PACKAGE/path or an HF dataset; a list of them is concatenated "
                                             "(required)")
    eval_dataset: str | list | None = field(None, "evaluated every epoch; picks the best checkpoint (none: no "
                                                  "evaluation)")
    test_dataset: str | list | None = field(None, "held-out split scored before and after training")
    text_column: str = field("text", "column holding the text")
    label_column: str = field("label", "column holding the label (multi_label: a list of labels)")
    labels: list[str] | None = field(None, "label names in id order; default: the distinct labels of the training "
                                           "data, sorted. A data value matches a name; an integer matching no name "
                                           "is read as an index into this list")
    multi_label: bool = field(False, "each text has zero or more labels (sigmoid + BCE)")
    threshold: float = field(0.5, "multi_label: a label is predicted when its probability >= threshold")
    max_length: int = field(256, "truncate texts to this many tokens")

    def __post_init__(self):
        from tunesmith.data.source import check_sources

        if not self.dataset:
            raise UserError("field 'dataset' is required")
        for key in ("dataset", "eval_dataset", "test_dataset"):
            check_sources(getattr(self, key), key, weights=False)
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise UserError(f"field 'labels': names must be distinct, got {self.labels}")
        if not 0 < self.threshold < 1:
            raise UserError(f"field 'threshold': must be between 0 and 1, got {self.threshold}")
        if self.max_length < 2:
            raise UserError(f"field 'max_length' must be at least 2, got {self.max_length}")


@dataclass
class ClassifyLoraArgs(LoraArgs):
    """LoRA"""

    use_peft: bool = field(True, "LoRA adapters (true) or full fine-tuning (false)")
    lora_r: int = field(4, "LoRA rank")
    lora_alpha: float = field(32, "LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = field(0.01, "dropout on the LoRA input")
    lora_target_modules: list[str] | None = field(
        None, "module names that get adapters, or all-linear; default: the attention query projection "
              "(query / q_lin / q_proj)")
    modules_to_save: list[str] | None = field(
        None, "extra modules trained fully under LoRA (the new head and any module missing from the checkpoint "
              "always are)")

    def __post_init__(self):  # no all-linear default: the query projection is found in the model
        check_lora_values(self)


@dataclass
class ClassifyTrainingPart(TrainingArguments):
    """Training (every transformers.TrainingArguments key)"""

    output_dir: str | None = field("outputs/classify", "where checkpoints and the final model go")
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
        for name in ("eval_strategy", "save_strategy", "logging_strategy"):
            if getattr(self, name) in (False, "False", "false"):  # YAML reads a bare `no` as false
                setattr(self, name, "no")
        if self.label_names is None:
            self.label_names = ["labels"]
        if self.metric_for_best_model and self.metric_for_best_model.startswith("eval_"):
            self.metric_for_best_model = self.metric_for_best_model[len("eval_"):]
        check_training_values(self)
        super().__post_init__()


class ClassifyConfig(Config):
    """``tunesmith classify`` options: every key of the parts below, flat."""

    PARTS = (("classify", ClassifyArgs), ("model", ModelArgs), ("data", ClassifyDataArgs),
             ("lora", ClassifyLoraArgs), ("neftune", NEFTuneArgs), ("training", ClassifyTrainingPart))

    @classmethod
    def prepare(cls, by_part: dict[str, dict]) -> None:
        if not by_part["data"].get("eval_dataset"):  # nothing to evaluate: no per-epoch evaluation, no best checkpoint
            by_part["training"].update(eval_strategy="no", load_best_model_at_end=False)

    def validate(self) -> None:
        if self.model.load_in_4bit:
            raise UserError("field 'load_in_4bit' is not supported by classify")
