"""`tunesmith dpo` options: the shared model, data, LoRA and NEFTune parts, DPO's own part (the loss), and
TrainingArguments."""
from __future__ import annotations

from dataclasses import dataclass

from tunesmith.config import Config, DataArgs, LoraArgs, ModelArgs, NEFTuneArgs, field
from tunesmith.errors import UserError
from tunesmith.preference.config import LOSS_HELP, check_loss_keys
from tunesmith.recipes.training import TrainingPart


@dataclass
class DPOArgs:
    """DPO (the loss; the reference is the starting model, scored once before training)"""

    loss_type: str = field("sigmoid", LOSS_HELP["loss_type"])
    beta: float = field(0.1, "The loss's beta (DPO's KL weight; ORPO's lambda).")
    label_smoothing: float = field(0.0, LOSS_HELP["label_smoothing"])
    dpop_lambda: float = field(50.0, LOSS_HELP["dpop_lambda"])
    simpo_gamma: float = field(0.5, LOSS_HELP["simpo_gamma"])
    disable_dropout: bool = field(True, "Turn the model's dropout off (LoRA's too) in training, as TRL's DPO does: the "
                                        "policy is then scored as its reference was.")
    shard_size: int = field(1024, "Pairs per shard of reference log-probs on disk (a killed run keeps the shards "
                                  "written).")

    def __post_init__(self):
        check_loss_keys(self, [self.beta])
        if self.shard_size < 1:
            raise UserError(f"field 'shard_size' must be at least 1, got {self.shard_size}")


@dataclass
class DPODataArgs(DataArgs):
    """Data (preference pairs)"""

    dataset_format: str = field("auto", "auto, preference (prompt/chosen/rejected as text or conversations), "
                                        "implicit (chosen/rejected sharing their prompt), ultrafeedback or hh.")
    template: str | None = field(None, "Prompt template (alpaca, instruction_response, qa, chat, or a format string); "
                                       "default: the one the model was saved with, else chat when the tokenizer has "
                                       "a chat template, else alpaca.")

    def __post_init__(self):
        for key, why in (("packing", "a pair's two answers are scored as rows of one batch; padding_free is the "
                                     "padding-free layout for pairs"),
                         ("train_on_prompt", "the loss compares the answers' log-probs")):
            if getattr(self, key):
                raise UserError(f"field '{key}' is not supported by DPO ({why})")
        from tunesmith.data.preference import PREFERENCE_FORMATS

        if self.dataset_format not in ("auto",) + PREFERENCE_FORMATS:
            raise UserError(f"field 'dataset_format' must be auto or one of {', '.join(PREFERENCE_FORMATS)}, got "
                            f"{self.dataset_format!r}")
        super().__post_init__()


@dataclass
class DPOTrainingPart(TrainingPart):
    """Training (every transformers.TrainingArguments key)"""

    learning_rate: float = field(1e-6, "Peak learning rate (TRL's DPO default).")
    lr_scheduler_type: str = field("linear", "Learning-rate schedule.")
    num_train_epochs: float = field(1.0, "Epochs over the pairs.")


class DPOConfig(Config):
    """Every key of the parts below, flat; ``cfg.training`` is the TrainingArguments the Trainer gets."""

    PARTS = (("dpo", DPOArgs), ("model", ModelArgs), ("data", DPODataArgs), ("lora", LoraArgs),
             ("neftune", NEFTuneArgs), ("training", DPOTrainingPart))

    def validate(self) -> None:
        if self.model.load_in_4bit:
            self.lora.use_peft = True
