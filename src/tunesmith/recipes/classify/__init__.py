"""Sequence classification (LoRA or full) with per-epoch metrics and the best checkpoint: ``tunesmith classify``, and
``tunesmith predict`` to label texts with the result."""
from tunesmith.recipes.classify.config import ClassifyConfig
from tunesmith.recipes.classify.predict import PredictConfig, predict, predict_texts
from tunesmith.recipes.classify.run import train

__all__ = ["ClassifyConfig", "PredictConfig", "predict", "predict_texts", "train"]
