"""`tunesmith dpo`: preference training (DPO and its kin) on the user's own pairs, through the shared preference
engine (:mod:`tunesmith.preference`)."""
from tunesmith.recipes.dpo.config import DPOConfig
from tunesmith.recipes.dpo.run import cli, train

__all__ = ["DPOConfig", "cli", "train"]
