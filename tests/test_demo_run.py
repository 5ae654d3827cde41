"""`tunesmith demo` end to end (quick mode: a few steps) and its bad-input errors."""
from __future__ import annotations

import json
import shutil

import pytest

from tunesmith.cli import main
from tunesmith.demo import base
from tunesmith.demo.run import DemoConfig, check_output, fact_accuracy, prepare_output, summary_table
from tunesmith.demo.world import FactJudge, World, biography
from tunesmith.errors import UserError

needs_base = pytest.mark.skipif(not (base.BASE_DIR / base.MANIFEST).is_file(), reason="base model not built yet")


@needs_base
def test_quick_demo_runs_end_to_end_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--spin", "1", "--dpo", "true", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "report:" in printed and "win rate vs SFT" in printed
    # the stages are named and numbered as they run (issue 23.3): 2 trainings, SPIN, DPO, 4 evaluations, the report
    for line in ("[1/9] SFT run", "[2/9] NEFTune run (alpha 5)", "[3/9] SPIN run: 1 iteration(s) on the SFT model",
                 "[4/9] DPO run on the SFT model, pairs with one wrong fact",
                 "[5/9] evaluate sft: generate answers, losses, facts", "[9/9] report"):
        assert line in printed.splitlines(), printed
    assert "[9/9] report: done in " in printed
    state = json.loads((out / "demo.json").read_text())
    assert state["complete"] is True
    assert set(state["per_variant"]) == {"sft", "neftune", "spin1", "dpo"}
    # DPO ran from the plain SFT model on the world's pairs (TRAIN people's answers vs one wrong fact)
    dpo_run = json.loads((out / "runs/dpo-seed0/tunesmith_run.json").read_text())
    assert dpo_run["config"]["model_name_or_path"].endswith("runs/sft-seed0")
    pairs = [json.loads(x) for x in (out / "data/pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["chosen"] != p["rejected"] for p in pairs)
    assert "## DPO" in (out / "report.md").read_text()
    # SPIN ran with the demo's recipe and the authors' sampling, and its diagnostics are in the report
    spin_state = json.loads((out / "runs/spin-seed0/tunesmith_run.json").read_text())
    cfg = DemoConfig()
    assert {k: spin_state["config"][k] for k in ("learning_rate", "beta", "num_train_epochs")} == {
        "learning_rate": [cfg.spin_learning_rate], "beta": [cfg.spin_beta], "num_train_epochs": [cfg.spin_epochs]}
    gen = spin_state["stages"]["finished"]["iteration-0/generate"]
    assert (gen["do_sample"], gen["temperature"], gen["top_p"]) == (True, 0.8, 0.95)
    summary = json.loads((out / "runs/spin-seed0/summary.json").read_text())[0]
    for name in ("sft-seed0", "neftune-seed0"):
        run = out / "runs" / name
        assert (run / "tunesmith.yaml").is_file() and (run / "eval.json").is_file()
        facts = json.loads((run / "facts.json").read_text())
        assert facts["heldout"]["answers"] == 8
    # The NEFTune run really was trained with noise, the plain one without.
    import yaml

    assert yaml.safe_load((out / "runs/neftune-seed0/tunesmith.yaml").read_text())["neftune_noise_alpha"] == 5.0
    plain = yaml.safe_load((out / "runs/sft-seed0/tunesmith.yaml").read_text())
    assert plain["neftune_noise_alpha"] is None and plain["train_sampling_strategy"] == "random"
    md = (out / "report.md").read_text()
    for png in ("summary.png", "loss_curves.png", "winrates.png"):
        assert (out / png).stat().st_size > 1000 and f"({png})" in md
    assert "QUICK MODE" in md and (out / "report.html").read_text().count("<img") >= 3
    assert "## SPIN per iteration" in md
    row = next(line for line in md.splitlines() if line.startswith("| 0 | 1 |"))  # seed 0, iteration 1
    assert f"{summary['ref_real']:.2f} → {summary['policy_real']:.2f}" in row
    assert f"{summary['identical']:.2f}" in row
    wr = json.loads((out / "judge/neftune-vs-sft-seed0/winrate.json").read_text())
    assert wr["n"] + wr["unjudged"] == 8 and wr["unjudged"] == 0
    # Held-out prompts are about held-out people only.
    world = World(seed=base.provenance()["world"]["seed"], n_people=base.provenance()["world"]["n_people"])
    held = {p.name for p in world.heldout_people}
    judge = FactJudge(world)
    for line in (out / "data/heldout_prompts.jsonl").read_text().splitlines():
        assert {p.name for p in judge.people_in(json.loads(line)["instruction"])} <= held



def test_a_previous_demo_is_replaced_and_nothing_else_touched(tmp_path):
    out = tmp_path / "demo"
    (out / "runs" / "sft-seed0").mkdir(parents=True)
    (out / "runs" / "sft-seed0" / "stale").write_text("x")
    (out / "report.md").write_text("old")
    (out / "my_notes.txt").write_text("keep")
    with pytest.raises(UserError, match="holds something else"):
        check_output(DemoConfig(output=str(out)), 2)
    (out / "demo.json").write_text("{}")
    assert check_output(DemoConfig(output=str(out)), 2) == out
    prepare_output(out)
    assert sorted(p.name for p in out.iterdir()) == ["my_notes.txt"]
    prepare_output(tmp_path / "fresh" / "dir")
    assert (tmp_path / "fresh" / "dir").is_dir()


def test_output_directory_holding_something_else_is_refused(tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.tex").write_text("precious")
    assert main(["demo", "--quick", "--output", str(busy)]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds something else" in err and len(err.splitlines()) == 1
    assert (busy / "thesis.tex").read_text() == "precious"
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        check_output(DemoConfig(output=str(afile)), 2)


def test_too_little_disk_is_refused(tmp_path, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(UserError, match="MB free"):
        check_output(DemoConfig(output=str(tmp_path / "new")), 2)
    assert not (tmp_path / "new").exists()


@needs_base
def test_corrupted_base_model_stops_the_demo_with_one_line(tmp_path, capsys):
    bad = tmp_path / "base"
    shutil.copytree(base.BASE_DIR, bad)
    (bad / "config.json").write_text((bad / "config.json").read_text().replace("4", "5", 1))
    assert main(["demo", "--quick", "--output", str(tmp_path / "out"), "--base_model", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "checksum mismatch" in err and "config.json" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_bad_options_are_one_line_errors(capsys):
    for argv, msg in ((["--seeds", "0"], "seeds must be at least 1"), (["--spin", "-1"], "spin must be 0"),
                      (["--neftune_alpha", "0"], "neftune_alpha must be > 0"),
                      (["--sedes", "2"], "unknown flag --sedes (did you mean --seeds?)")):
        assert main(["demo", *argv]) == 2
        assert msg in capsys.readouterr().err


def test_fact_accuracy_and_summary_table(tmp_path):
    world = World(seed=0, n_people=40)
    judge = FactJudge(world)
    p, q = world.people[0], world.people[1]
    wrong = next(c for c in world.cities if c != p.birthplace)
    rows = [{"instruction": f"Tell me about {p.name}.", "output": biography(p), "reference": biography(p)},
            {"instruction": f"Where was {p.name} born?", "output": f"{p.name} was born in {wrong}.",
             "reference": f"{p.name} was born in {p.birthplace}."},
            {"instruction": f"Tell me about {q.name}.", "output": "I do not know.", "reference": biography(q)}]
    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    acc = fact_accuracy(judge, path)
    assert (acc["correct"], acc["incorrect"], acc["answers"]) == (5, 1, 3)
    assert acc["precision"] == pytest.approx(5 / 6) and acc["recall"] == pytest.approx(5 / 11)
    header, table = summary_table({"sft": [{"train_loss": 1.0}, {"train_loss": 2.0}], "neftune": [{}]})
    assert header[:3] == ["measure", "sft", "neftune"]
    assert table[0][1] == "1.5000 ± 0.7071" and table[0][2] == "–"
