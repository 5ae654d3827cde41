"""Supervised fine-tuning (full, LoRA, QLoRA) with per-example NEFTune: ``tunesmith sft``."""
from tunesmith.recipes.sft.config import SFTConfig
from tunesmith.recipes.sft.run import prepare_data, train
from tunesmith.recipes.sft.trainer import TunesmithTrainer

__all__ = ["SFTConfig", "TunesmithTrainer", "prepare_data", "train"]
