"""The `tunesmith` command itself: --version, help that needs no torch and ends with one newline, and typos (a
command, a flag) named where they were typed with the key most likely meant -- before any heavy import."""
import subprocess
import sys

import pytest

from tunesmith import reference
from tunesmith.cli import COMMANDS, main

HEAVY = ("torch", "transformers", "datasets", "peft", "accelerate")


def _in_a_fresh_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys\nfrom tunesmith.cli import COMMANDS, main\n" + code],
                          capture_output=True, text=True, timeout=300)


def test_a_misspelt_flag_is_named_as_a_flag_with_the_key_it_likely_means(tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text("model_name_or_path: m\ndataset: d.jsonl\noutput_dir: o\n")
    assert main(["sft", "--config", str(run), "--lerning_rate", "1e-4"]) == 2
    err = capsys.readouterr().err
    assert err == "tunesmith sft: error: unknown flag --lerning_rate (did you mean --learning_rate?)\n"
    assert main(["sft", "--config", str(run), "--loraa_r", "8", "--report_to", "none"]) == 2
    assert "unknown flag --loraa_r (did you mean --lora_r?)" in capsys.readouterr().err
    assert main(["sft", "--config", str(run), "--zzz", "1"]) == 2
    assert capsys.readouterr().err.strip().endswith("unknown flag --zzz")  # nothing close: no guess
    assert main(["sft", "--no_packing", "--use_lora", "--no-train_on_prompt", "--lerning_rate", "1"]) == 2
    assert capsys.readouterr().err.endswith("unknown flag --lerning_rate (did you mean --learning_rate?)\n")


def test_a_misspelt_flag_fails_before_torch_is_imported():
    r = _in_a_fresh_python("assert main(['sft', '--model_name_or_path', 'm', '--lerning_rate', '1']) == 2\n"
                           f"print(sorted(m for m in {HEAVY} if m in sys.modules))")
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr
    assert r.stderr == "tunesmith sft: error: unknown flag --lerning_rate (did you mean --learning_rate?)\n"


def test_version(capsys):
    from tunesmith import __version__

    for flag in ("--version", "-V"):
        assert main([flag]) == 0
        assert capsys.readouterr().out == f"tunesmith {__version__}\n"


def test_every_help_ends_with_a_newline(capsys):
    assert main(["--help"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    for name in COMMANDS:
        assert main([name, "--help"]) == 0, name
        out = capsys.readouterr().out
        assert out.endswith("\n") and not out.endswith("\n\n"), name


def test_help_imports_neither_torch_nor_transformers():
    """`tunesmith --help`, `--version` and every `tunesmith COMMAND --help` print from the committed reference."""
    r = _in_a_fresh_python("assert main(['--help']) == 0 and main(['--version']) == 0\n"
                           "for name in COMMANDS:\n    assert main([name, '--help']) == 0, name\n"
                           f"print(sorted(m for m in {HEAVY} if m in sys.modules))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_an_unknown_command_is_escaped_and_suggests_the_command(capsys):
    assert main(["sfft"]) == 2
    assert capsys.readouterr().err.startswith("tunesmith: unknown command 'sfft' (did you mean sft?)\nusage:")
    assert main(["x\x1b[2Jy\n"]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and err.startswith("tunesmith: unknown command 'x\\x1b[2Jy\\n'\nusage:")


def test_an_unknown_flag_with_control_characters_is_escaped(capsys):
    assert main(["eval", "--model", "m", "--\x1b]0;owned\x07"]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and err.count("\n") == 1


@pytest.mark.parametrize("name", [n for n in COMMANDS if "groups" in reference.load()["commands"][n]])
def test_every_key_and_old_name_passes_the_early_flag_check(name):
    """The early check (before the command's module loads) refuses only what the command's own parser refuses."""
    entry = reference.load()["commands"][name]
    keys = [row["key"] for group in entry["groups"] for row in group["keys"]]
    booleans = [row["key"] for group in entry["groups"] for row in group["keys"] if "bool" in row["type"].split(" | ")]
    argv = [f"--{k}" for k in keys + list(entry["aliases"]) + entry["hidden"]] + [f"--no_{k}" for k in booleans]
    reference.check_flags(name, argv)
    with pytest.raises(Exception, match="unknown flag --no_such_key"):
        reference.check_flags(name, argv + ["--no_such_key"])


def test_a_reference_from_another_transformers_is_not_used(monkeypatch):
    """TrainingArguments' keys differ between transformers versions: help and the early flag check then go through
    the command's own parser (slower, never wrong)."""
    from importlib import metadata

    reference.load.cache_clear()
    monkeypatch.setattr(metadata, "version", lambda name: "0.0.1")
    try:
        assert reference.command_help("sft") is None
        reference.check_flags("sft", ["--a_key_of_a_newer_transformers", "1"])  # left to sft's own parser
    finally:
        monkeypatch.undo()
        reference.load.cache_clear()
    assert reference.command_help("sft") is not None
