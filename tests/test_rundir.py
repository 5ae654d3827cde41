"""Run directories: output-file checks, the lock, fingerprints in real Trainer checkpoints, torn checkpoints, refusals,
and directory replacement that never deletes what tunesmith did not write."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from enum import Enum
from pathlib import Path

import pytest

from tunesmith import rundir as R
from tunesmith.errors import UserError

FP = R.Fingerprint.of({"learning_rate": 0.001, "seed": 0, "max_steps": 4})
OTHER = R.Fingerprint.of({"learning_rate": 0.002, "seed": 0, "max_steps": 4})


# ---------------------------------------------------------------- a real Trainer checkpoint, stamped

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Trainer run that saves checkpoint-2 and checkpoint-4, with the fingerprint callback attached."""
    import torch

    out = tmp_path_factory.mktemp("trained")
    torch.manual_seed(0)
    stamping_trainer(out).train()
    return out


def stamping_trainer(out):
    """4 steps of a tiny Llama, checkpoints every 2, with the fingerprint callback attached."""
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    rows = [{"input_ids": [1, 2, 3, 4, i % 7 + 5], "labels": [1, 2, 3, 4, i % 7 + 5]} for i in range(16)]
    args = TrainingArguments(output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=4,
                             report_to="none", use_cpu=True, disable_tqdm=True, logging_steps=100, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.add_callback(R.checkpoint_callback(FP))
    return trainer


def copy_checkpoint(trained, dest, step=4, name=None):
    target = Path(dest) / (name or f"checkpoint-{step}")
    shutil.copytree(trained / f"checkpoint-{step}", target)
    return target


def test_trainer_checkpoints_carry_the_fingerprint(trained):
    for step in (2, 4):
        stamp = R.checkpoint_fingerprint(trained / f"checkpoint-{step}")
        assert stamp == {"fingerprint": FP.digest, "config": FP.values}
        R.check_checkpoint(trained / f"checkpoint-{step}", FP)  # does not raise
    with pytest.raises(UserError, match=r"checkpoint-4: belongs to a run with other settings \(differs in "
                                        r"learning_rate\)"):
        R.check_checkpoint(trained / "checkpoint-4", OTHER)
    assert R.checkpoint_state(trained / "checkpoint-4")["global_step"] == 4


def test_resuming_a_stamped_checkpoint_keeps_stamping(trained, tmp_path):
    """The Trainer reloads trainer_state.json on resume; the stamp must survive into later checkpoints."""
    import torch

    copy_checkpoint(trained, tmp_path, 2)
    stamping_trainer(tmp_path).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert R.checkpoint_fingerprint(tmp_path / "checkpoint-4")["fingerprint"] == FP.digest
    a = torch.load(tmp_path / "checkpoint-4" / "optimizer.pt", weights_only=True)
    b = torch.load(trained / "checkpoint-4" / "optimizer.pt", weights_only=True)
    assert all(torch.equal(a["state"][k]["exp_avg"], b["state"][k]["exp_avg"]) for k in a["state"])


# ---------------------------------------------------------------- torn checkpoints

def test_newest_complete_checkpoint_skips_torn_ones(trained, tmp_path, caplog):
    from transformers.trainer_utils import get_last_checkpoint

    copy_checkpoint(trained, tmp_path, 2)
    copy_checkpoint(trained, tmp_path, 4)
    no_state = copy_checkpoint(trained, tmp_path, 4, "checkpoint-6")
    (no_state / "trainer_state.json").unlink()  # killed before the Trainer's last write
    half_state = copy_checkpoint(trained, tmp_path, 4, "checkpoint-8")
    text = (half_state / "trainer_state.json").read_text()
    (half_state / "trainer_state.json").write_text(text[: len(text) // 2])  # killed during it
    cut_weights = copy_checkpoint(trained, tmp_path, 4, "checkpoint-10")
    weights = cut_weights / "model.safetensors"
    with open(weights, "r+b") as f:  # a full disk: the weights file ends early
        f.truncate(weights.stat().st_size - 100)
    (tmp_path / "checkpoint-12").write_text("not a directory")
    (tmp_path / "checkpoint-x").mkdir()
    assert get_last_checkpoint(str(tmp_path)).endswith("checkpoint-10")  # what transformers would resume from
    assert [p.name for p in R.checkpoints(tmp_path)] == [f"checkpoint-{n}" for n in (10, 8, 6, 4, 2)]
    assert R.newest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert "checkpoint-10: model.safetensors is truncated" in caplog.text
    assert "torn" in R.checkpoint_problem(half_state) and "no trainer_state.json" in R.checkpoint_problem(no_state)
    with pytest.raises(UserError, match=r"resume_from_checkpoint: .*checkpoint-8 is not a complete checkpoint"):
        R.check_checkpoint(half_state, FP)
    assert R.newest_complete_checkpoint(tmp_path / "missing") is None


def test_safetensors_problem(tmp_path):
    import torch
    from safetensors.torch import save_file

    f = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(10, 10), "b": torch.zeros(3)}, f)
    assert R.safetensors_problem(f) is None
    data = f.read_bytes()
    for cut in (len(data) - 1, 100, 7, 0):
        f.write_bytes(data[:cut])
        assert "truncated" in R.safetensors_problem(f) or "not valid" in R.safetensors_problem(f), cut
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    assert "not valid" in R.safetensors_problem(f)


# ---------------------------------------------------------------- fingerprint

def test_fingerprint_digest_and_differences():
    class Sched(str, Enum):
        LINEAR = "linear"

    fp = R.Fingerprint.of({"learning_rate": 1e-3, "lr_scheduler_type": Sched.LINEAR, "lora_target_modules": ("q", "v"),
                           "data": "abc"})
    assert fp.values == {"learning_rate": 1e-3, "lr_scheduler_type": "linear", "lora_target_modules": ["q", "v"],
                         "data": "abc"}  # enums by their value, tuples as JSON lists
    expected = hashlib.sha256(json.dumps(fp.values, sort_keys=True).encode()).hexdigest()[:16]
    assert fp.digest == expected == R.digest(fp.values)
    assert fp.differences({**fp.values, "learning_rate": 2e-3, "extra": 1}) == ["extra", "learning_rate"]


# ---------------------------------------------------------------- output files

def test_check_output_file(tmp_path):
    with pytest.raises(UserError, match=r"'output' names a directory"):
        R.check_output_file(tmp_path)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match=r"afile is a file, not a directory"):
        R.check_output_file(tmp_path / "afile" / "sub" / "out.jsonl")
    assert R.check_output_file(tmp_path / "new" / "deeper" / "out.jsonl") == tmp_path / "new/deeper/out.jsonl"
    assert not (tmp_path / "new").exists()  # checking creates nothing


# ---------------------------------------------------------------- the lock

HOLD = ("import sys, time; from tunesmith.rundir import RunLock; RunLock(sys.argv[1], 'sft').acquire(); "
        "print('locked', flush=True); time.sleep(60)")


def holder_process(directory):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_second_live_run_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path):
    p = holder_process(tmp_path)
    try:
        with pytest.raises(UserError, match=rf"in use by another tunesmith run \(sft\), pid {p.pid}"):
            R.RunLock(tmp_path).acquire()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert json.loads((tmp_path / R.LOCK_FILE).read_text())["pid"] == p.pid  # left behind by the kill
    with R.RunLock(tmp_path, "spin") as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        with pytest.raises(UserError, match=rf"pid {os.getpid()}"):  # even from this process, another handle
            R.RunLock(tmp_path).acquire()
    assert not (tmp_path / R.LOCK_FILE).exists()


def test_lock_file_written_by_hand_or_left_by_a_dead_pid(tmp_path):
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / R.LOCK_FILE).write_text(str(sleeper.pid))  # a live pid, no flock held
        with pytest.raises(UserError, match=rf"pid {sleeper.pid}"):
            R.RunLock(tmp_path).acquire()
        # the same pid, but another process start time: the pid was reused, the old owner is gone
        (tmp_path / R.LOCK_FILE).write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename,
                                                        "started": "1"}))
        R.RunLock(tmp_path).acquire().release()
        sleeper.kill()  # a zombie until reaped: dead all the same
        time.sleep(0.1)
        (tmp_path / R.LOCK_FILE).write_text(str(sleeper.pid))
        R.RunLock(tmp_path).acquire().release()
    finally:
        sleeper.kill()
        sleeper.wait()
    (tmp_path / R.LOCK_FILE).write_text(str(sleeper.pid))  # reaped: no such process
    R.RunLock(tmp_path).acquire().release()
    (tmp_path / R.LOCK_FILE).write_text("garbage")
    R.RunLock(tmp_path).acquire().release()


# ---------------------------------------------------------------- open_run

def test_fresh_run_takes_the_directory_and_the_lock(tmp_path):
    out = tmp_path / "run"
    with R.open_run(out, "sft", FP) as run:
        assert run.checkpoint is None and not run.finished
        assert R.read_owner(out) == {"command": "sft", "fingerprint": FP.digest, "config": FP.values}
        assert (out / R.LOCK_FILE).exists()
        with pytest.raises(UserError, match=rf"{out}: in use by another tunesmith run \(sft\), pid {os.getpid()}"):
            R.open_run(out, "sft", FP)
    assert not (out / R.LOCK_FILE).exists()
    # a run killed before its first checkpoint left only bookkeeping: a fresh start is fine
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    R.open_run(out, "sft", OTHER).close()
    assert R.read_owner(out)["fingerprint"] == OTHER.digest


def test_output_dir_that_is_a_file_or_cannot_be_made(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match=r"output_dir is a file"):
        R.open_run(tmp_path / "f", "sft", FP)
    with pytest.raises(UserError, match=r"cannot create output_dir"):
        R.open_run(tmp_path / "f" / "sub", "sft", FP)


def test_foreign_or_finished_directories_are_refused(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match=r"not empty and not a tunesmith run directory"):
        R.open_run(foreign, "sft", FP)
    assert (foreign / "notes.txt").read_text() == "keep me" and not (foreign / R.LOCK_FILE).exists()

    done = tmp_path / "done"
    R.open_run(done, "sft", FP).close()
    (done / R.FINISHED_FILE).write_text("learning_rate: 0.001\n")
    with pytest.raises(UserError, match=r"holds a finished run \(tunesmith.yaml\); choose another output_dir"):
        R.open_run(done, "sft", FP)
    with pytest.raises(UserError, match=r"holds a finished tunesmith sft run, not a classify run"):
        R.open_run(done, "classify", FP, resume=True)
    with pytest.raises(UserError, match=r"finished run with other settings \(differs in learning_rate\)"):
        R.open_run(done, "sft", OTHER, resume=True)
    before = {p.name: p.stat().st_mtime_ns for p in done.iterdir()}
    with R.open_run(done, "sft", FP, resume="true") as run:
        assert run.finished and run.checkpoint is None
    assert {p.name: p.stat().st_mtime_ns for p in done.iterdir()} == before  # nothing rewritten
    # a finished run from before owner records existed is still a finished run
    old = tmp_path / "old"
    old.mkdir()
    (old / R.FINISHED_FILE).write_text("x: 1\n")
    with pytest.raises(UserError, match=r"holds a finished run"):
        R.open_run(old, "classify", FP)


def test_resume_picks_the_newest_complete_checkpoint_of_this_run(trained, tmp_path):
    out = tmp_path / "run"
    R.open_run(out, "sft", FP).close()
    copy_checkpoint(trained, out, 2)
    torn = copy_checkpoint(trained, out, 4)
    (torn / "trainer_state.json").write_text("{")
    with pytest.raises(UserError, match=r"holds checkpoints of an unfinished run \(newest: checkpoint-2\); set "
                                        r"resume_from_checkpoint: true"):
        R.open_run(out, "sft", FP)
    with R.open_run(out, "sft", FP, resume=True) as run:
        assert run.checkpoint == str(out / "checkpoint-2")
    with pytest.raises(UserError, match=r"checkpoint-2: belongs to a run with other settings \(differs in "
                                        r"learning_rate\)"):
        R.open_run(out, "sft", OTHER, resume="last")
    with R.open_run(out, "sft", FP, resume=str(out / "checkpoint-2")) as run:
        assert run.checkpoint == str(out / "checkpoint-2")
    with pytest.raises(UserError, match=r"checkpoint-4 is not a complete checkpoint"):
        R.open_run(out, "sft", FP, resume=str(torn))
    with pytest.raises(UserError, match=r"nowhere is not a checkpoint directory"):
        R.open_run(out, "sft", FP, resume=str(out / "nowhere"))
    with pytest.raises(UserError, match=r"holds a tunesmith sft run, not a spin run"):
        R.open_run(out, "spin", FP, resume=True)
    assert not (out / R.LOCK_FILE).exists()  # every refusal released the lock


def test_resume_without_any_checkpoint_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"resume_from_checkpoint: no complete checkpoint in .* to resume from"):
        R.open_run(tmp_path / "new", "sft", FP, resume=True)


def test_unstamped_checkpoint_is_not_resumed(trained, tmp_path):
    ckpt = copy_checkpoint(trained, tmp_path, 2)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    del state["stateful_callbacks"]["TunesmithRun"]
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(UserError, match=r"carries no tunesmith fingerprint"):
        R.open_run(tmp_path, "sft", FP, resume=True)


def test_other_ranks_only_read(tmp_path, trained):
    out = tmp_path / "run"
    run = R.open_run(out, "sft", FP, main=False)
    assert run.lock is None and not out.exists()  # rank > 0 creates nothing
    out.mkdir()
    (out / ".tunesmith_run.json.x1.tmp").write_text("{")  # rank 0 in the middle of writing its owner record
    assert R.open_run(out, "sft", FP, main=False).checkpoint is None  # not taken for a foreign file
    copy_checkpoint(trained, out, 2)
    assert R.open_run(out, "sft", FP, resume=True, main=False).checkpoint == str(out / "checkpoint-2")
    (out / R.FINISHED_FILE).write_text("x: 1\n")
    assert R.open_run(out, "sft", FP, resume=True, main=False).finished


# ---------------------------------------------------------------- replacing a directory (merge)

# ---------------------------------------------------------------- runs of several stages (SPIN, DPO)

def test_a_staged_run_is_continued_with_its_settings_and_refused_with_others(tmp_path):
    out = tmp_path / "run"
    with R.open_run(out, "spin", FP, continues=True) as run:
        assert run.stage("iteration-0/generate") is None
        folder = run.stage_dir("iteration-0/generate", "iteration-0/generations")
        (folder / "shard-00000.arrow").write_text("x")
        run.finish_stage("iteration-0/generate", {"prompts": 12})
    with R.open_run(out, "spin", FP, continues=True) as run:  # a rerun: what finished is recorded
        assert run.stage("iteration-0/generate") == {"prompts": 12} and not run.finished
        assert (run.stage_dir("iteration-0/generate", "iteration-0/generations") / "shard-00000.arrow").exists()
    with pytest.raises(UserError, match=r"holds a different spin run \(config differs in learning_rate\)"):
        R.open_run(out, "spin", OTHER, continues=True)
    with pytest.raises(UserError, match="holds a tunesmith spin run, not a dpo run"):
        R.open_run(out, "dpo", FP, continues=True)
    (out / R.FINISHED_FILE).write_text("done: true\n")
    with R.open_run(out, "spin", FP, continues=True) as run:
        assert run.finished
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="not empty and holds no spin run"):
        R.open_run(mine, "spin", FP, continues=True)
    assert not (mine / R.LOCK_FILE).exists()  # the lock was released on refusal


def test_a_fresh_start_keeps_the_stages_of_the_same_settings_and_clears_another_runs(tmp_path):
    """DPO's reference shards survive a crash before the first checkpoint (same settings: reused); a fresh start
    with other settings begins the stage again in an emptied folder."""
    out = tmp_path / "run"
    with R.open_run(out, "dpo", FP) as run:
        (run.stage_dir("reference") / "shard-00000.arrow").write_text("old")
        run.finish_stage("reference", {"pairs": 3})
    with R.open_run(out, "dpo", FP) as run:  # crashed before any checkpoint, started again
        assert run.stage("reference") == {"pairs": 3}
    with R.open_run(out, "dpo", OTHER) as run:
        assert run.stage("reference") is None
        assert list(run.stage_dir("reference").iterdir()) == []  # what the other settings wrote is gone
    assert R.read_owner(out)["fingerprint"] == OTHER.digest


def test_publish_dir_never_deletes_what_tunesmith_did_not_write(tmp_path):
    target = tmp_path / "merged"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    staging = R.staging_dir(target)
    (staging / "model.safetensors").write_text("weights")
    with pytest.raises(UserError, match=r"merged: not empty and was not written by tunesmith"):
        R.publish_dir(staging, target, "merge")
    assert (target / "thesis.tex").read_text() == "years of work"
    with pytest.raises(UserError, match=r"not empty and was not written by tunesmith"):
        R.check_replaceable(target, "merge")

    fresh = tmp_path / "fresh"
    R.publish_dir(staging, fresh, "merge")
    assert (fresh / "model.safetensors").read_text() == "weights" and R.read_owner(fresh)["command"] == "merge"
    again = R.staging_dir(fresh)
    (again / "model.safetensors").write_text("weights 2")
    R.publish_dir(again, fresh, "merge")  # tunesmith's own merge output is replaced
    assert (fresh / "model.safetensors").read_text() == "weights 2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "merged"]  # no staging or old copies left

    run = tmp_path / "run"
    R.open_run(run, "sft", FP).close()
    (run / "checkpoint-1").mkdir()
    with pytest.raises(UserError, match=r"not empty and holds a tunesmith sft run"):
        R.check_replaceable(run, "merge")
    empty = tmp_path / "empty"
    empty.mkdir()
    R.check_replaceable(empty, "merge")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"is a file"):
        R.check_replaceable(tmp_path / "file", "merge")
