"""Issue 18.1: nothing the user owns is overwritten. Every output of generate, eval, judge, report, predict, merge
is checked before any work; writes are atomic, stale temp files are cleaned, saved files follow the umask."""
import json
import os
import subprocess
import sys

import pytest

from conftest import fails, write_jsonl
from tunesmith.cli import main
from tunesmith.rundir import FINISHED_FILE, OWNER_FILE


@pytest.fixture
def finished_run(templated_model_dir):
    """A finished training run's directory (weights, marker, owner record)."""
    from pathlib import Path

    d = Path(templated_model_dir)
    (d / FINISHED_FILE).write_text("seed: 0\n")
    (d / OWNER_FILE).write_text(json.dumps({"command": "sft"}))
    return d


@pytest.fixture
def prompts(tmp_path):
    return write_jsonl(tmp_path / "p.jsonl", [{"instruction": "name a color", "output": "red"},
                                              {"instruction": "name a sea", "output": "blue"}])


def snapshot(path):
    return open(path, "rb").read()


def test_generate_never_writes_over_a_runs_weights(capsys, finished_run, prompts):
    weights = finished_run / "model.safetensors"
    before = snapshot(weights)
    fails(capsys, ["generate", "--model_name_or_path", str(finished_run), "--prompts", prompts,
                   "--output", str(weights)], r"would write over a file of the training run")
    fails(capsys, ["generate", "--model_name_or_path", str(finished_run), "--prompts", prompts,
                   "--output", str(weights), "--overwrite", "true"], r"training run")
    assert snapshot(weights) == before


def test_eval_never_writes_over_the_finished_marker(capsys, finished_run, prompts, tmp_path):
    gens = write_jsonl(tmp_path / "g.jsonl", [{"instruction": "a", "output": "b c d e f"}])
    marker = finished_run / FINISHED_FILE
    fails(capsys, ["eval", "--generations", gens, "--output", str(marker)], r"training run")
    # a marker not written yet is the run's too: writing it would call an unfinished run finished
    marker.unlink()
    fails(capsys, ["eval", "--generations", gens, "--output", str(marker)], r"training run")
    assert not marker.exists()
    fails(capsys, ["eval", "--generations", gens, "--output", str(finished_run / "checkpoint-3" / "x.json")],
          r"training run")


def test_an_input_is_never_the_output(capsys, finished_run, prompts, tmp_path):
    before = snapshot(prompts)
    fails(capsys, ["generate", "--model_name_or_path", str(finished_run), "--prompts", prompts,
                   "--output", prompts], r"also this command's input 'prompts'")
    fails(capsys, ["generate", "--model_name_or_path", str(finished_run), "--prompts", prompts,
                   "--output", prompts, "--overwrite", "true"], r"input 'prompts'")
    gens = write_jsonl(tmp_path / "g.jsonl", [{"instruction": "a", "output": "b c d e f"}])
    fails(capsys, ["eval", "--generations", gens, "--output", gens], r"input 'generations'")
    fails(capsys, ["predict", "--model_name_or_path", str(finished_run), "--dataset", prompts,
                   "--output", prompts], r"input 'dataset'")
    fails(capsys, ["judge", "--a", gens, "--b", gens, "--judge", "python", "--python_judge", "m:f",
                   "--output_dir", str(tmp_path), "--cache", gens], r"input 'a'")
    link = tmp_path / "link.jsonl"
    os.symlink(prompts, link)  # the same file under another name
    fails(capsys, ["generate", "--model_name_or_path", str(finished_run), "--prompts", prompts,
                   "--output", str(link)], r"input 'prompts'")
    assert snapshot(prompts) == before


def test_an_existing_file_needs_overwrite_unless_the_command_wrote_it(capsys, templated_model_dir, prompts,
                                                                         tmp_path):
    mine = tmp_path / "notes.jsonl"
    mine.write_text("my notes\n")
    argv = ["generate", "--model_name_or_path", templated_model_dir, "--prompts", prompts, "--max_new_tokens", "2",
            "--output", str(mine)]
    fails(capsys, argv, r"exists and was not written by tunesmith generate; .* --overwrite true")
    assert mine.read_text() == "my notes\n"
    assert main(argv + ["--overwrite", "true"]) == 0
    assert main(argv) == 0  # generate wrote it: a rerun replaces it
    mine.write_text(mine.read_text() + "edited\n")  # changed by the user since: theirs again
    fails(capsys, argv, r"exists and was not written")
    gens = write_jsonl(tmp_path / "g.jsonl", [{"instruction": "a", "output": "b c d e f"}])
    fails(capsys, ["eval", "--generations", gens, "--output", str(mine)], r"not written by tunesmith eval")


def test_judge_and_report_check_every_file_they_write(capsys, tmp_path):
    gens = write_jsonl(tmp_path / "g.jsonl", [{"instruction": "a", "output": "b c d e f"}])
    out = tmp_path / "j"
    out.mkdir()
    (out / "winrate.json").write_text("{}")  # the user's own
    fails(capsys, ["judge", "--a", gens, "--b", gens, "--judge", "python", "--python_judge", "m:f",
                   "--output_dir", str(out)], r"winrate\.json.* not written by tunesmith judge")
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"instruction": "mine"}\n')
    fails(capsys, ["judge", "--a", gens, "--b", gens, "--judge", "python", "--python_judge", "m:f",
                   "--output_dir", str(tmp_path / "j2"), "--cache", str(notes)], r"not a judge cache")
    rep = tmp_path / "r"
    rep.mkdir()
    (rep / "report.html").write_text("<p>mine</p>")
    fails(capsys, ["report", "--winrate", str(out), "--output", str(rep)], r"report\.html.* not written")
    assert (rep / "report.html").read_text() == "<p>mine</p>"


def test_merge_refuses_its_adapter_as_output(capsys, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    fails(capsys, ["merge", "--adapter", str(adapter), "--output", str(adapter)], r"input 'adapter'")


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_files_are_cleaned_by_the_next_run_in_that_place(tmp_path):
    from tunesmith.rundir import Fingerprint, RunLock, check_output_file, open_run, temp_prefix

    dead = _dead_pid()
    stale = temp_prefix("out.jsonl").replace(f"-{os.getpid()}.", f"-{dead}.") + "abc123.tmp"
    live = temp_prefix("out.jsonl") + "xyz789.tmp"  # this process: being written right now
    other = temp_prefix("other.jsonl").replace(f"-{os.getpid()}.", f"-{dead}.") + "abc.tmp"
    for name in (stale, live, other):
        (tmp_path / name).write_text("half")
    check_output_file(tmp_path / "out.jsonl", command="generate")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live, other])

    run = tmp_path / "run"
    run.mkdir()
    (run / OWNER_FILE).write_text(json.dumps({"command": "sft"}))
    (run / ".README.md.k2j4h5g6.tmp").write_text("half a card")  # older tunesmith: no pid in the name
    (run / "iteration-0").mkdir()
    (run / "iteration-0" / ".model.abcd1234.partial").mkdir()
    (run / "iteration-0" / ".model.abcd1234.partial" / "model.safetensors").write_bytes(b"x")
    with open_run(run, "sft", Fingerprint.of({}), None):
        pass
    assert not (run / ".README.md.k2j4h5g6.tmp").exists()
    assert list((run / "iteration-0").iterdir()) == []
    # SPIN takes the run lock itself: the lock is where the cleaning happens
    (run / ".m0.abcd1234.partial").mkdir()
    with RunLock(run, "spin"):
        pass
    assert not (run / ".m0.abcd1234.partial").exists()


def test_audit_writes_nothing(tiny_model_dir, alpaca_file, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["audit", "--model_name_or_path", tiny_model_dir, "--dataset", alpaca_file, "--output_dir",
                 str(out), "--show", "1"]) == 0
    assert not out.exists()


def test_audit_renders_with_the_chat_template_training_uses(tiny_model_dir, tmp_path, capsys):
    """Issue 18.8: audit loads the tokenizer as training does (model_revision, chat_template)."""
    from conftest import write_jsonl

    data = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "yes"}]}])
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{% for m in messages %}[[{{ m['role'] }}]] {{ m['content'] }}{% if m['role'] == 'assistant' %}"
                   "{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}[[assistant]] {% endif %}")
    assert main(["audit", "--model_name_or_path", tiny_model_dir, "--dataset", data, "--template", "chat",
                 "--chat_template", str(tpl), "--output_dir", str(tmp_path / "o"), "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "[[user]] hi" in out and "<|im_start|>" not in out, out
