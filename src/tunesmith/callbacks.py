"""TrainerCallbacks every recipe shares: ``metrics.jsonl``, one JSON line per log event; log lines that print numbers
as numbers (:func:`readable_logs`)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback


def log_line(step: int, logs: dict) -> str:
    """``step 25: loss 3.723, grad_norm 9.077, learning_rate 0.00104, epoch 0.49`` — numbers as numbers, 4
    significant digits (transformers 5 prints them as quoted strings: ``'loss': '3.723'``)."""
    def number(v):
        return float(f"{v:.4g}") if isinstance(v, float) and math.isfinite(v) else v

    return f"step {step}: " + ", ".join(f"{k} {number(v)}" for k, v in logs.items() if k != "total_flos")


class ReadableProgressCallback(ProgressCallback):
    """The Trainer's progress bar, with log lines from :func:`log_line`."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            self.training_bar.write(log_line(state.global_step, logs))


class ReadablePrinterCallback(PrinterCallback):
    """The Trainer's printer (``disable_tqdm``), with log lines from :func:`log_line`, from rank 0 only."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            print(log_line(state.global_step, logs))


def readable_logs(trainer) -> None:
    """Swap the Trainer's own progress / printer callback for the readable one (same bar, same events)."""
    for old, new in ((ProgressCallback, ReadableProgressCallback), (PrinterCallback, ReadablePrinterCallback)):
        if trainer.pop_callback(old) is not None:
            trainer.add_callback(new)

class JsonlMetrics(TrainerCallback):
    """Appends every log event as one JSON line to ``metrics.jsonl`` (main process only)."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run restarts from its checkpoint: drop lines logged after it (and a line torn by the kill), so
        # no step appears twice. A fresh run (step 0) starts a fresh log.
        if state.is_world_process_zero and self.path.exists():
            from tunesmith.io import atomic_write_text

            keep = []
            for line in self.path.read_text(encoding="utf-8").splitlines(keepends=True):
                try:
                    step = json.loads(line).get("step")
                except json.JSONDecodeError:
                    continue
                if isinstance(step, int) and 0 < step <= state.global_step:
                    keep.append(line)
            atomic_write_text(self.path, "".join(keep))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")

