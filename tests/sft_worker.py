"""Runs one SFT job from a JSON config (used by tests under torchrun and for kill/resume).

usage: python sft_worker.py CONFIG.json [KILL_AT_STEP]
"""
import hashlib
import json
import os
import signal
import sys

import torch
from transformers import TrainerCallback

from tunesmith.recipes import sft


class KillAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordWorld(TrainerCallback):
    def __init__(self, path):
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        rng = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()  # the stream noise is drawn from
        with open(f"{self.path}.rank{args.process_index}", "w") as f:
            json.dump({"world_size": world, "args_world_size": args.world_size, "rng": rng}, f)


if __name__ == "__main__":
    cfg = json.load(open(sys.argv[1]))
    callbacks = [RecordWorld(os.path.join(cfg["output_dir"], "world"))]
    if len(sys.argv) > 2:
        callbacks.append(KillAt(int(sys.argv[2])))
    os.makedirs(cfg["output_dir"], exist_ok=True)
    sft.train(cfg, callbacks=callbacks)
