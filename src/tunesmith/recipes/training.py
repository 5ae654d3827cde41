"""Training plumbing the recipes share: the training part of the causal-LM recipes (sft, spin), that is
``transformers.TrainingArguments`` with tunesmith's defaults (every key works; recipes hand it to the Trainer as its
``args``), and finding the last complete Trainer checkpoint."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainingArguments

from tunesmith.config import _f
from tunesmith.errors import UserError


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
        return True
    except ImportError:
        return False


@dataclass
class TrainingPart(TrainingArguments):
    """Training (every transformers.TrainingArguments key)"""

    output_dir: str | None = _f(None, "Where checkpoints and the final model go (required).")
    report_to: str | list[str] | None = _f("tensorboard", "Loggers: tensorboard, wandb, none, ...")
    logging_steps: float = _f(10, "Log every N steps.")
    include_num_input_tokens_seen: str | bool = _f("non_padding", "Count non-padding tokens (for tokens/s).")
    remove_unused_columns: bool = _f(False, "Keep tunesmith's columns.")

    def __post_init__(self):
        if not self.output_dir:
            raise UserError("field 'output_dir' is required")
        if isinstance(self.report_to, str) and self.report_to == "tensorboard" and not _has_tensorboard():
            self.report_to = "none"
        super().__post_init__()


def last_complete_checkpoint(directory: Path) -> str | None:
    """The newest checkpoint-N whose trainer_state.json (the Trainer writes it last) is complete, if any."""
    if not directory.is_dir():
        return None
    found = []
    for p in directory.iterdir():
        if p.is_dir() and p.name.startswith("checkpoint-") and p.name[11:].isdigit():
            found.append((int(p.name[11:]), p))
    for _, p in sorted(found, reverse=True):
        try:
            json.loads((p / "trainer_state.json").read_text(encoding="utf-8"))
            return str(p)
        except (OSError, json.JSONDecodeError):
            continue
    return None
