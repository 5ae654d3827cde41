"""TrainerCallbacks every recipe shares: ``metrics.jsonl``, one JSON line per log event."""
from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

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

