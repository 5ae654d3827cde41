"""Long waits say what they do (issue 23.3): numbered stages with durations, the final noise-free evaluation announced
and not computed twice, and train_loss_eval_samples never more than the data."""
import json
import logging
from pathlib import Path

import torch

from conftest import alpaca_rows, sft_config, write_jsonl
from tunesmith.progress import Stages, duration
from tunesmith.recipes import sft
from tunesmith.recipes.sft.run import train_loss_sample


def test_stages_number_the_work_and_time_it():
    said = []
    stages = Stages(3, say=said.append)
    with stages("SFT run"):
        pass
    stages.skip("NEFTune run")
    stages.start("report")
    stages.end()
    assert said[0] == "[1/3] SFT run" and said[1].startswith("[1/3] SFT run: done in ") and said[1].endswith(" s")
    assert said[2] == "[2/3] NEFTune run: done earlier" and said[3] == "[3/3] report"
    quiet = []
    with Stages(1, speak=False, say=quiet.append)("x"):  # ranks > 0 keep the count and say nothing
        pass
    assert quiet == []
    assert [duration(s) for s in (0.44, 12.4, 185, 3725)] == ["0.4 s", "12 s", "3 min 05 s", "1 h 02 min"]


def test_train_loss_sample_never_exceeds_the_data():
    assert sorted(train_loss_sample(16, 256, 0)) == list(range(16))  # the default 256 on a 16-example set
    same_draw = torch.randperm(100, generator=torch.Generator().manual_seed(3))[:8].tolist()
    assert train_loss_sample(100, 8, 3) == same_draw  # the sample the runs have always scored


def metrics_rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_final_evaluation_is_announced_with_its_real_size(tiny_model_dir, tmp_path, caplog):
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(16))
    with caplog.at_level(logging.INFO, logger="tunesmith"):  # the default train_loss_eval_samples: 256
        out = sft.train(sft_config(tiny_model_dir, data, tmp_path / "run", max_length=256,
                                   train_loss_eval_samples=256))
    said = [r.getMessage() for r in caplog.records]
    assert "final noise-free evaluation: 16 training examples" in said, said
    assert any(m.startswith("final noise-free evaluation: done in ") for m in said)
    assert len([r for r in metrics_rows(out) if "eval_train_loss" in r]) == 1


def test_the_evaluation_at_the_last_step_is_not_repeated(tiny_model_dir, tmp_path, caplog):
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(16))
    with caplog.at_level(logging.INFO, logger="tunesmith"):
        out = sft.train(sft_config(tiny_model_dir, data, tmp_path / "run", max_length=256, max_steps=4,
                                   eval_strategy="steps", eval_steps=2, train_loss_eval_samples=8))
    rows = [r for r in metrics_rows(out) if "eval_train_loss" in r]
    assert [r["step"] for r in rows] == [2, 4]  # before: [2, 4, 4], the last one computed twice
    assert not any("final noise-free evaluation" in r.getMessage() for r in caplog.records)
    card = (Path(out) / "README.md").read_text()
    assert f"- eval_train_loss: {rows[-1]['eval_train_loss']:.4f}" in card  # the model card has the last numbers
