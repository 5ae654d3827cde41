"""SPIN self-play fine-tuning: every iteration in one resumable run: ``tunesmith spin``."""
from tunesmith.recipes.spin.config import SPINConfig
from tunesmith.recipes.spin.run import SpinRun, train

__all__ = ["SPINConfig", "SpinRun", "train"]
