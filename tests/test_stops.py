"""Issue 18.3 (divergence stop) and 18.7 (polite stop): a run that diverges stops with one line and keeps its last
good checkpoint; SIGTERM / Ctrl-C end sft, spin and classify at the next step with a complete checkpoint and one
line saying how to resume."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from conftest import alpaca_rows, free_port, sft_config, write_jsonl
from tunesmith.errors import Stopped, UserError
from tunesmith.recipes import sft
from tunesmith.rundir import FINISHED_FILE, checkpoint_problem, checkpoints


class PoisonAt(TrainerCallback):
    """Puts a NaN into one weight before step ``step`` (what an exploding update does)."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step - 1:
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).view(-1)[0] = float("nan")


class SignalAt(TrainerCallback):
    """Sends this process ``sig`` during step ``step`` (as a scheduler or Ctrl-C would)."""

    def __init__(self, step, sig=signal.SIGTERM, times=1):
        self.step, self.sig, self.times = step, sig, times

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step - 1:
            for _ in range(self.times):
                os.kill(os.getpid(), self.sig)


def weights_finite(ckpt):
    from safetensors.torch import load_file

    return all(torch.isfinite(t).all() for t in load_file(str(Path(ckpt) / "model.safetensors")).values())


def test_divergence_stops_with_one_line_and_keeps_the_last_good_checkpoint(tiny_model_dir, alpaca_file, tmp_path):
    out = tmp_path / "run"
    cfg = sft_config(tiny_model_dir, alpaca_file, out, max_steps=6, save_strategy="steps", save_steps=1,
                     train_loss_eval_samples=0)
    with pytest.raises(UserError) as e:
        sft.train(cfg, callbacks=[PoisonAt(3)])
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    assert "diverged at step 3" in msg and "likely cause" in msg and "checkpoint-2" in msg, msg
    assert [c.name for c in checkpoints(out)] == ["checkpoint-2", "checkpoint-1"]
    assert checkpoint_problem(out / "checkpoint-2") is None and weights_finite(out / "checkpoint-2")
    assert not (out / FINISHED_FILE).exists() and not (out / "model.safetensors").exists()


def test_a_non_finite_logged_loss_stops_too():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from tunesmith.callbacks import DivergenceStop

    stop, control = DivergenceStop(), TrainerControl()
    args = TrainingArguments(output_dir="/nonexistent", learning_rate=5e-5, report_to="none", use_cpu=True)
    state = TrainerState(global_step=7)
    stop.on_log(args, state, control, logs={"loss": 2.0, "grad_norm": 1.0})
    assert not control.should_training_stop
    stop.on_log(args, state, control, logs={"loss": float("inf"), "grad_norm": 1.0})
    assert control.should_training_stop and not control.should_save
    with pytest.raises(UserError, match=r"diverged at step 8: the logged loss became inf; .*no checkpoint"):
        stop.check()


def test_sigterm_ends_sft_at_the_step_with_a_checkpoint_and_resumes(tiny_model_dir, alpaca_file, tmp_path):
    out = tmp_path / "run"
    cfg = sft_config(tiny_model_dir, alpaca_file, out, max_steps=6, save_strategy="no", train_loss_eval_samples=0)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped) as e:
        sft.train(cfg, callbacks=[SignalAt(3)])
    assert signal.getsignal(signal.SIGTERM) == before  # handlers are put back
    assert e.value.exit_code == 128 + signal.SIGTERM
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "SIGTERM at step 3" in msg and "resume_from_checkpoint true" in msg, msg
    assert [c.name for c in checkpoints(out)] == ["checkpoint-3"] and checkpoint_problem(out / "checkpoint-3") is None
    mask = os.umask(0)
    os.umask(mask)
    assert (out / "checkpoint-3" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask  # not 0600
    assert not (out / FINISHED_FILE).exists()
    sft.train(cfg | {"resume_from_checkpoint": True})
    assert (out / FINISHED_FILE).exists()
    steps = [r["step"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_ctrl_c_ends_classify_and_twice_stops_at_once(tmp_path):
    from test_classify import _base_config, _topic_rows, _write_jsonl, build_tiny_encoder

    from tunesmith.recipes.classify.run import train as classify

    encoder = build_tiny_encoder(tmp_path / "enc")
    data = _write_jsonl(tmp_path / "train.jsonl", _topic_rows(48, 0))
    cfg = _base_config(tmp_path, encoder, dataset=data, max_steps=5, save_strategy="no", eval_strategy="no",
                       load_best_model_at_end=False)
    with pytest.raises(Stopped) as e:
        classify(cfg, callbacks=[SignalAt(2, signal.SIGINT)])
    assert e.value.exit_code == 130 and "SIGINT at step 2" in str(e.value)
    assert checkpoint_problem(tmp_path / "out" / "checkpoint-2") is None
    # resuming on data edited in place is refused, naming the data; on the same data it finishes the run
    original = Path(data).read_bytes()
    Path(data).write_bytes(original.replace(b"\"text\": \"", b"\"text\": \"x", 1))
    with pytest.raises(UserError, match=r"checkpoint-2: belongs to a run with other settings \(differs in data\)"):
        classify(cfg | {"resume_from_checkpoint": True})
    Path(data).write_bytes(original)
    classify(cfg | {"resume_from_checkpoint": True})
    assert (tmp_path / "out" / FINISHED_FILE).exists()
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):  # the second Ctrl-C does not wait for the step to end
        classify(cfg | {"output_dir": str(tmp_path / "out2")}, callbacks=[SignalAt(2, signal.SIGINT, times=2)])
    assert signal.getsignal(signal.SIGINT) == before


def test_handlers_are_put_back_when_training_fails(tiny_model_dir, alpaca_file, tmp_path):
    class Boom(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            raise RuntimeError("out of memory")

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError, match="out of memory"):
        sft.train(sft_config(tiny_model_dir, alpaca_file, tmp_path / "run", max_steps=2), callbacks=[Boom()])
    assert signal.getsignal(signal.SIGTERM) == before


def test_sigterm_ends_a_spin_iteration_with_a_checkpoint(tiny_model_dir, tmp_path):
    from test_spin import spin_config

    from tunesmith.recipes import spin

    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(12))
    out = tmp_path / "spin"
    cfg = spin_config(tiny_model_dir, data, out, num_iterations=1, save_strategy="no")
    with pytest.raises(Stopped, match=r"SIGTERM at step 2.*checkpoint-2 is complete"):
        spin.train(cfg, callbacks=[SignalAt(2)])
    assert not (out / "iteration-0" / "model").exists()
    spin.train(cfg | {"resume_from_checkpoint": True})
    assert (out / "iteration-0" / "model" / "model.safetensors").exists()


@pytest.mark.slow  # a real `tunesmith sft` process, stopped from outside (~20 s on a loaded machine)
def test_cli_sigterm_from_outside_exits_143_with_one_line(tiny_model_dir, alpaca_file, tmp_path):
    out = tmp_path / "run"
    cfg = sft_config(tiny_model_dir, alpaca_file, out, max_steps=100_000, save_strategy="no",
                     train_loss_eval_samples=0)
    argv = [sys.executable, "-m", "tunesmith.cli", "sft"] + [
        x for k, v in cfg.items() for x in (f"--{k}", v if isinstance(v, str) else json.dumps(v))]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("tunesmith sft: stopped by SIGTERM at step") and "resume" in last, err
    assert "Traceback" not in err
    [ckpt] = checkpoints(out)
    assert checkpoint_problem(ckpt) is None


@pytest.mark.slow  # a 2-process torchrun (~60 s on a loaded 2-core machine)
def test_under_ddp_a_sigterm_to_one_rank_stops_both_at_the_same_step(tiny_model_dir, alpaca_file, tmp_path):
    """The ranks agree every step: SIGTERM reaching only rank 1 still stops rank 0 at the same step, the checkpoint
    (a collective save) is complete, and nothing hangs."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "run"
    cfg = sft_config(tiny_model_dir, alpaca_file, out, max_steps=100_000, save_strategy="no",
                     train_loss_eval_samples=0, per_device_train_batch_size=2)
    cfg.pop("use_cpu")  # the launcher and the machine decide
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            "-m", "tunesmith.cli", "sft"] + [
        x for k, v in cfg.items() for x in (f"--{k}", v if isinstance(v, str) else json.dumps(v))]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size):
        time.sleep(0.2)
    workers = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    ranks = {}
    for pid in workers:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next(int(e.split(b"=")[1]) for e in environ if e.startswith(b"RANK="))
        ranks[rank] = pid
    os.kill(ranks[1], signal.SIGTERM)  # rank 1 only
    _, err = proc.communicate(timeout=300)
    stopped = [line for line in err.splitlines() if "stopped by SIGTERM at step" in line]
    assert len(stopped) == 2, err[-4000:]  # both ranks stopped ...
    steps = {line.split("at step ")[1].split(";")[0] for line in stopped}
    assert len(steps) == 1, stopped  # ... at the same step
    [ckpt] = checkpoints(out)
    assert ckpt.name == f"checkpoint-{steps.pop()}" and checkpoint_problem(ckpt) is None
    assert not (out / FINISHED_FILE).exists()
