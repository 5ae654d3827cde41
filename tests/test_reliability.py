"""Issue 10: what fuzzing and an audit found, each case run through the real commands (tiny models, seconds each)."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from conftest import alpaca_rows, fails, free_port, sft_config, write_jsonl
from tunesmith.errors import UserError
from tunesmith.recipes import sft
from tunesmith.rundir import LOCK_FILE, RunLock, checkpoints


def sft_argv(cfg: dict) -> list[str]:
    return ["sft"] + [x for k, v in cfg.items() for x in (f"--{k}", json.dumps(v) if not isinstance(v, str) else v)]


class CrashOnSave(TrainerCallback):
    """Dies right after the Trainer wrote checkpoint ``step`` (as a kill between the last checkpoint and the final
    save would)."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("killed")


def logged_steps(out):
    return [r["step"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]


# ---------------------------------------------------------------- items 2, 3, 4: resume


def test_resume_after_the_last_checkpoint_never_trains_past_max_steps(tiny_model_dir, alpaca_file, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    # 32 examples, batch 4: 8 steps an epoch, so step 3 ends mid-epoch (where the Trainer resumes one step too far)
    cfg = sft_config(tiny_model_dir, alpaca_file, out, max_steps=3, save_strategy="steps", save_steps=3,
                     train_loss_eval_samples=0)
    with pytest.raises(RuntimeError, match="killed"):
        sft.train(cfg, callbacks=[CrashOnSave(3)])
    assert not (out / "tunesmith.yaml").exists() and not (out / LOCK_FILE).exists()
    sft.train(dict(cfg, resume_from_checkpoint=True))
    assert logged_steps(out) == [1, 2, 3]  # no step 4
    final, ckpt = load_file(out / "model.safetensors"), load_file(out / "checkpoint-3" / "model.safetensors")
    assert final.keys() == ckpt.keys() and all(torch.equal(final[k], ckpt[k]) for k in final)
    # resuming the finished run does nothing: tunesmith.yaml (and everything else) is not rewritten
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert sft.train(dict(cfg, resume_from_checkpoint=True)) == str(out)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_resume_refuses_another_runs_checkpoints_and_skips_torn_ones(tiny_model_dir, alpaca_file, tmp_path,
                                                                     capsys):
    out = tmp_path / "run"
    cfg = sft_config(tiny_model_dir, alpaca_file, out, max_steps=6, save_strategy="steps", save_steps=2,
                     train_loss_eval_samples=0)
    with pytest.raises(RuntimeError, match="killed"):
        sft.train(cfg, callbacks=[CrashOnSave(4)])
    assert [p.name for p in checkpoints(out)] == ["checkpoint-4", "checkpoint-2"]
    # a new run (other settings) into the directory: refused, it would mix with the killed run's checkpoints
    fails(capsys, sft_argv(dict(cfg, learning_rate=1e-3)),
          r"holds checkpoints of an unfinished run \(newest: checkpoint-4\); set resume_from_checkpoint: true")
    # resuming with other settings: refused, naming what differs
    fails(capsys, sft_argv(dict(cfg, learning_rate=1e-3, resume_from_checkpoint="true")),
          r"checkpoint-4: belongs to a run with other settings \(differs in learning_rate\)")
    # the same settings on data edited in place (one character): refused, naming the data
    data = Path(alpaca_file)
    original = data.read_bytes()
    data.write_bytes(original.replace(b"e", b"E", 1))
    fails(capsys, sft_argv(dict(cfg, resume_from_checkpoint="true")),
          r"checkpoint-4: belongs to a run with other settings \(differs in data\)")
    data.write_bytes(original)
    # a torn newest checkpoint (killed while saving) is skipped: the resume starts from checkpoint-2
    (out / "checkpoint-4" / "trainer_state.json").write_text('{"global_st')
    sft.train(dict(cfg, resume_from_checkpoint=True))
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6] and (out / "tunesmith.yaml").exists()


def test_resume_without_a_checkpoint_is_one_line(tiny_model_dir, alpaca_file, tmp_path, capsys):
    cfg = sft_config(tiny_model_dir, alpaca_file, tmp_path / "new", max_steps=2, resume_from_checkpoint="true")
    fails(capsys, sft_argv(cfg), r"resume_from_checkpoint: no complete checkpoint in .*new to resume from")


# ---------------------------------------------------------------- item 6: output directories


def test_finished_runs_are_refused_by_sft_and_classify(tiny_model_dir, alpaca_file, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = sft_config(tiny_model_dir, alpaca_file, out, max_steps=1, train_loss_eval_samples=0)
    sft.train(cfg)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    err = fails(capsys, sft_argv(cfg), r"run: holds a finished run \(tunesmith.yaml\); choose another output_dir")
    assert "overwrite_output_dir" not in err
    texts = write_jsonl(tmp_path / "t.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    fails(capsys, ["classify", "--model_name_or_path", tiny_model_dir, "--dataset", texts, "--output_dir", str(out),
                   "--num_train_epochs", "1", "--use_cpu", "true"],
          r"holds a finished tunesmith sft run, not a classify run")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_a_second_run_into_a_locked_directory_names_the_pid(tiny_model_dir, alpaca_file, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with RunLock(out, "sft"):
        fails(capsys, sft_argv(sft_config(tiny_model_dir, alpaca_file, out, max_steps=1)),
              rf"in use by another tunesmith run \(sft\), pid {os.getpid()}")
    assert not list(checkpoints(out)) and not (out / "tunesmith.yaml").exists()


# ---------------------------------------------------------------- items 7, 8: one line, not a traceback or silence


@pytest.mark.parametrize("over,expected", [
    ({"learning_rate": -1}, r"field 'learning_rate' must be > 0, got -1"),
    ({"learning_rate": 0}, r"field 'learning_rate' must be > 0, got 0"),
    ({"per_device_train_batch_size": 0}, r"field 'per_device_train_batch_size' must be at least 1"),
    ({"gradient_accumulation_steps": 0}, r"field 'gradient_accumulation_steps' must be at least 1"),
    ({"max_steps": 0}, r"field 'max_steps' must be a positive number"),
    ({"max_steps": -5}, r"field 'max_steps' must be a positive number"),
    ({"num_train_epochs": -1}, r"field 'num_train_epochs' must be > 0, got -1"),
    ({"max_length": 1000}, r"field 'max_length': 1000 is more than the 512 positions"),
])
def test_nonsense_settings_are_one_line_and_train_nothing(tiny_model_dir, alpaca_file, tmp_path, capsys, over,
                                                          expected):
    out = tmp_path / "out"
    fails(capsys, sft_argv(sft_config(tiny_model_dir, alpaca_file, out, **over)), expected)
    assert not (out / "tunesmith.yaml").exists()


def test_output_dir_that_is_a_file_and_torn_weights(tiny_model_dir, alpaca_file, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    fails(capsys, sft_argv(sft_config(tiny_model_dir, alpaca_file, tmp_path / "afile", max_steps=1)),
          r"afile: output_dir is a file, not a directory")
    fails(capsys, sft_argv(sft_config(tiny_model_dir, alpaca_file, tmp_path / "afile" / "out", max_steps=1)),
          r"cannot create output_dir")
    torn = tmp_path / "torn"
    shutil.copytree(tiny_model_dir, torn)
    weights = torn / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    fails(capsys, sft_argv(sft_config(str(torn), alpaca_file, tmp_path / "o", max_steps=1)),
          r"torn: cannot load model \(model.safetensors is truncated")


def test_duplicate_yaml_keys_name_file_and_line(tiny_model_dir, alpaca_file, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model_name_or_path: {tiny_model_dir}\nlearning_rate: 0.001\ndataset: {alpaca_file}\n"
                   f"learning_rate: 0.1\noutput_dir: {tmp_path / 'o'}\n")
    fails(capsys, ["sft", "--config", str(cfg)],
          r"run.yaml:4: invalid YAML \(duplicate key 'learning_rate' \(first given on line 2\)\)")
    nested = tmp_path / "nested.yaml"
    nested.write_text("a:\n  b: 1\n  b: 2\n")
    from tunesmith.config import read_yaml

    with pytest.raises(UserError, match=r"nested.yaml:3: invalid YAML \(duplicate key 'b'"):
        read_yaml(nested)
    fine = tmp_path / "fine.yaml"
    fine.write_text("base: &b {x: 1}\nother:\n  <<: *b\n  y: 2\n")
    assert read_yaml(fine)["other"] == {"x": 1, "y": 2}


def test_audit_show_not_a_number(tiny_model_dir, alpaca_file, capsys):
    fails(capsys, ["audit", "--model_name_or_path", tiny_model_dir, "--dataset", alpaca_file, "--output_dir", "x",
                 "--show", "x"], r"field 'show': expected an integer, got 'x'")


# ---------------------------------------------------------------- item 1: merge (tests/test_models.py)


# ---------------------------------------------------------------- item 13: NEFTune noise under real DDP


@pytest.mark.slow  # a 2-process torchrun (~30 s on a loaded 2-core machine)
def test_ddp_ranks_draw_neftune_noise_from_different_streams(tiny_model_dir, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(16))
    cfg = sft_config(tiny_model_dir, data, tmp_path / "run", max_steps=1, train_loss_eval_samples=0,
                     per_device_train_batch_size=2, neftune_noise_alpha=5.0)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(here), str(here.parent / "src")]))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), str(here / "sft_worker.py"), str(tmp_path / "cfg.json")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    worlds = [json.loads((tmp_path / "run" / f"world.rank{k}").read_text()) for k in (0, 1)]
    assert worlds[0]["world_size"] == 2 and worlds[0]["rng"] != worlds[1]["rng"]


@pytest.mark.slow  # a 2-process torchrun (~30 s on a loaded 2-core machine)
def test_ddp_ranks_draw_their_own_noise_with_neftune_callback_too(tiny_model_dir, tmp_path):
    """Issue 18.8: the drop-in NEFTuneCallback (for trainers tunesmith does not own) follows the mixin's per-rank
    rule: the noise each rank adds at its first step differs (equal lengths on both ranks: one stream would give
    equal noise)."""
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(here), str(here.parent / "src")]))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), str(here / "neftune_callback_worker.py"), tiny_model_dir, str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"noise.rank{k}.json").read_text()) for k in (0, 1)]
    assert ranks[0]["shape"] == ranks[1]["shape"]
    a, b = (torch.tensor(x["noise"]) for x in ranks)
    assert a.abs().mean() > 0.01 and b.abs().mean() > 0.01
    assert (a - b).abs().max() > 0.01  # one stream: equal up to float32 rounding (~1e-7)
