"""`tunesmith sft` options: the shared model, data, LoRA and NEFTune parts, SFT's own part, and TrainingArguments."""
from __future__ import annotations

from dataclasses import dataclass

from tunesmith.config import Config, DataArgs, LoraArgs, ModelArgs, NEFTuneArgs, field
from tunesmith.recipes.training import TrainingPart


@dataclass
class SFTArgs:
    """SFT"""

    train_loss_eval_samples: int = field(256, "Training examples scored noise-free at each evaluation (0 = none).")


class SFTConfig(Config):
    """Every key of the parts below, flat; ``cfg.training`` is the TrainingArguments the Trainer gets."""

    PARTS = (("sft", SFTArgs), ("model", ModelArgs), ("data", DataArgs), ("lora", LoraArgs),
             ("neftune", NEFTuneArgs), ("training", TrainingPart))

    def validate(self) -> None:
        if self.model.load_in_4bit:
            self.lora.use_peft = True
