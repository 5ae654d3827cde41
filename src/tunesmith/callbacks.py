"""TrainerCallbacks every recipe shares: ``metrics.jsonl`` (:class:`JsonlMetrics`), log lines that print numbers as
numbers (:func:`readable_logs`), the divergence stop (:class:`DivergenceStop`) and the polite stop on SIGTERM /
Ctrl-C (:class:`PoliteStop`). They use only the Trainer's callback events, so any ``transformers.Trainer`` subclass
takes them."""
from __future__ import annotations

import json
import math
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from tunesmith.errors import Stopped, UserError


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


def last_step_evaluation(trainer, wanted: list[str]) -> dict | None:
    """The ``eval_*`` metrics the Trainer logged at its last step (under an eval_strategy it has just evaluated
    there), or None when any of the ``wanted`` keys is missing: the caller evaluates then."""
    logged = {}
    for row in trainer.state.log_history:
        if row.get("step") == trainer.state.global_step:
            logged.update({k: v for k, v in row.items() if k.startswith("eval_")})
    return logged if all(key in logged for key in wanted) else None


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



# ---------------------------------------------------------------- divergence stop

def _finite_grad_norm(model) -> tuple[bool, float]:
    """Whether the gradients of ``model`` are all finite, and their total norm (one reduction over the gradients;
    under FSDP2 the local shards' norm is completed across ranks, so every rank decides alike)."""
    import torch

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:  # DeepSpeed keeps its gradients itself (and handles overflow itself)
        return True, 0.0
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, error_if_nonfinite=False)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    value = float(norm)
    return math.isfinite(value), value


class DivergenceStop(TrainerCallback):
    """Stops training when the gradient norm (checked before every optimizer step) or the logged loss is not
    finite: the step that diverged is not applied (its gradients are dropped, so the optimizer leaves the weights as
    they were) and not saved, so the newest checkpoint is the last good one. The recipe then calls :meth:`check`,
    which raises a one-line :class:`UserError` naming the step and the likely cause, and writes no finished model.

    Under fp16 mixed precision an overflowing step is the loss scaler's business (it skips the step and lowers the
    scale): only ``fp16_patience`` overflowing steps in a row count as a divergence."""

    def __init__(self, fp16_patience: int = 20):
        self.problem: str | None = None
        self.fp16_patience = fp16_patience
        self._overflows = 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None or self.problem:
            return
        finite, norm = _finite_grad_norm(model)
        if finite:
            self._overflows = 0
            return
        if args.fp16:
            self._overflows += 1
            if self._overflows < self.fp16_patience:
                return
        for p in model.parameters():  # the optimizer skips parameters without a gradient: nothing is applied
            p.grad = None
        self._stop(args, state, control, f"the gradient norm became {norm}")

    def on_step_end(self, args, state, control, **kwargs):
        if self.problem:
            control.should_save = False  # the newest checkpoint stays the last good one

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value) and not self.problem:
                self._stop(args, state, control, f"the logged {key.replace('_', ' ')} became {value}")
        if self.problem:
            control.should_save = False

    def _stop(self, args, state, control, what: str) -> None:
        control.should_training_stop = True
        step = state.global_step + 1
        from tunesmith.rundir import checkpoints, checkpoint_problem

        good = [c for c in checkpoints(args.output_dir)
                if int(c.name.split("-")[1]) < step and checkpoint_problem(c) is None]
        kept = f"the last good checkpoint is {good[0]}" if good else "no checkpoint was saved before it"
        self.problem = (f"training diverged at step {step}: {what}; likely cause: {_likely_cause(args)}. "
                        f"Stopped; {kept}; no model was saved")

    def check(self) -> None:
        if self.problem:
            raise UserError(self.problem)


def _likely_cause(args) -> str:
    if args.learning_rate > 1e-3:
        return f"learning_rate {args.learning_rate:g} is high for fine-tuning (1e-6 .. 1e-4 is usual)"
    if args.fp16:
        return "fp16 overflow (use bf16 where the GPU has it, or a lower learning_rate)"
    if not args.max_grad_norm:
        return "no gradient clipping (max_grad_norm 0) with this learning_rate"
    return (f"learning_rate {args.learning_rate:g} too high for this model and data, or a non-finite value in the "
            f"data or the model")


# ---------------------------------------------------------------- polite stop

class PoliteStop(TrainerCallback):
    """SIGTERM (what schedulers and spot instances send before they kill) and Ctrl-C (SIGINT) end training at the next
    step boundary, with a complete checkpoint of that step. The same signal again stops at once (SIGINT: a
    KeyboardInterrupt; SIGTERM: the default action). Under several processes the ranks agree each step (one small
    all-reduce) so they stop, and save, at the same step. After ``trainer.train()`` returns, the recipe calls
    :meth:`check`, which raises :class:`Stopped` (one line: where the checkpoint is and how to resume; exit status
    128 + the signal's number).

    Handlers are installed from ``on_train_begin`` to ``on_train_end`` (main thread only); ``with stop:`` installs
    them around other work too (SPIN's generation), where the caller polls :attr:`requested` at its own
    boundaries (e.g. a shard)."""

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self, command: str):
        self.command = command
        self.signum: int | None = None
        self.stopped_at: int | None = None
        self.checkpoint: str | None = None
        self._previous: dict = {}
        self._depth = 0

    # ---- handlers
    def install(self) -> None:
        import signal
        import threading

        self._depth += 1
        if self._depth > 1 or threading.current_thread() is not threading.main_thread():
            return
        for name in self.SIGNALS:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self, everywhere: bool = False) -> None:
        """Put the previous handlers back (``everywhere``: whatever the nesting, as on leaving ``with``)."""
        import signal

        self._depth = 0 if everywhere else max(0, self._depth - 1)
        if self._depth:
            return
        for sig, previous in self._previous.items():
            try:
                signal.signal(sig, previous)
            except (ValueError, TypeError):
                pass
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        import os
        import signal
        import sys

        if self.signum == signum:  # asked twice: stop now
            self.uninstall(everywhere=True)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        if self.signum is None:
            self.signum = signum
            print(f"tunesmith {self.command}: {signal.Signals(signum).name} received: stopping at the end of this "
                  f"step with a checkpoint (send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "PoliteStop":
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.uninstall(everywhere=True)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    # ---- Trainer events
    def on_train_begin(self, args, state, control, **kwargs):
        self.install()

    def on_train_end(self, args, state, control, **kwargs):
        self.uninstall()

    def on_step_end(self, args, state, control, **kwargs):
        asked = self._agreed(args)
        if asked and not self.stopped_at:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
            self.checkpoint = f"{args.output_dir}/checkpoint-{state.global_step}"

    def _agreed(self, args) -> int:
        """The signal any rank received (0: none): every rank takes part in the same all-reduce each step."""
        import torch

        mine = self.signum or 0
        if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([mine], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            mine = int(flag.item())
            if mine and self.signum is None:
                self.signum = mine
        return mine

    def check(self) -> None:
        """Raise :class:`Stopped` when training ended because of a signal."""
        if self.signum is None:
            return
        import signal

        name = signal.Signals(self.signum).name
        where = (f"checkpoint {self.checkpoint} is complete" if self.checkpoint
                 else "no training step had ended: nothing was saved")
        raise Stopped(f"stopped by {name}{f' at step {self.stopped_at}' if self.stopped_at else ''}; {where}; "
                      f"resume with the same command and --resume_from_checkpoint true", 128 + self.signum)


def stop_callbacks(command: str) -> tuple[DivergenceStop, PoliteStop]:
    """The two stops every training recipe adds to its Trainer (``trainer.add_callback``) and checks, in this order,
    after ``trainer.train()`` returns (``divergence.check(); polite.check()``)."""
    return DivergenceStop(), PoliteStop(command)
