"""Every `tunesmith ...` command line shown in README.md and docs/ still parses: its command exists and every key it
sets (on the command line or in a config file of this repository it names) is a key of that command, with a value
of the key's type. So a renamed key or command fails here, not for a reader. Also: the pages README links exist and
no relative link in the docs points nowhere."""
from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import re
import shlex
from functools import cache
from pathlib import Path

import pytest

from tunesmith import cli, config

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
NOT_KEYS = {"help", "h", "key", "config"}


def _code_texts(text: str):
    """(line number, text) of every code line (indented block or fenced) and every inline `code span`."""
    lines = text.split("\n")
    fenced = False
    pending, start = "", 0
    for no, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.startswith("    "):
            body = line.strip()
            if pending:
                body, no = pending + " " + body, start
            if body.endswith("\\"):
                pending, start = body[:-1], no
                continue
            pending = ""
            yield no, body
        else:
            for span in re.findall(r"`([^`]+)`", line):
                yield no, span


def _command_lines(text: str):
    """(line number, command, argv) for each tunesmith command in the page's code."""
    for no, code in _code_texts(text):
        if "tunesmith" not in code:
            continue
        try:
            tokens = shlex.split(code, comments=True)
        except ValueError:
            tokens = code.split("#")[0].split()
        segment: list[str] = []
        for tok in tokens + ["&&"]:
            if tok in ("&&", "||", "|", ";"):
                found = _find_command(segment)
                if found:
                    yield (no, *found)
                segment = []
            else:
                segment.append(tok)


def _find_command(tokens: list[str]):
    for i, tok in enumerate(tokens):
        head = tok == "tunesmith" or (tok == "tunesmith.cli" and i > 0 and tokens[i - 1] == "-m")
        if head and i + 1 < len(tokens):
            name = tokens[i + 1]
            if name.startswith("-") or name.isupper():  # `tunesmith --help`, `tunesmith COMMAND --help`
                return None
            args = [t.strip("[]") for t in tokens[i + 2:]]
            return name, [a for a in args if a and a != "..."]
    return None


DOC_COMMANDS = [(page, no, name, argv) for page in PAGES
                for no, name, argv in _command_lines(page.read_text(encoding="utf-8"))]


def test_the_docs_show_commands():
    shown = {name for _, _, name, _ in DOC_COMMANDS}
    assert {"sft", "spin", "classify", "eval", "generate", "plan", "demo"} <= shown
    assert any(p.name == "README.md" for p, *_ in DOC_COMMANDS)


@cache
def _keys_and_types(name: str):
    """(known keys -> type or None, aliases) for a command: from the config class its cli() parses with, or else from
    the keys its --help lists."""
    module = importlib.import_module(cli.COMMANDS[name][0])
    cls = _config_class(module)
    if cls is not None:
        if isinstance(cls, type) and issubclass(cls, config.Config):
            types = {}
            for _, part in cls.PARTS:
                for key, tp in config._field_types(part).items():
                    types.setdefault(key, tp)
        else:
            types = config._field_types(cls)
        return types, config.ALIASES
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main([name, "--help"]) == 0
    listed = {k: None for k in re.findall(r"--(\w+)", out.getvalue())}
    if "key" in listed:  # "--key value overrides a config key" (plan): the training recipes' keys count too
        for recipe in ("sft", "spin", "classify"):
            listed = {**_keys_and_types(recipe)[0], **listed}
    return listed, {}


def _config_class(module):
    """The class ``module.cli`` hands to ``parse_cli`` (imported inside cli() or at the module's top)."""
    fn = getattr(module, "cli", None)
    if fn is None:
        return None
    source = inspect.getsource(fn)
    m = re.search(r"parse_cli\(\s*(\w+)", source)
    if not m:
        return None
    cls_name = m.group(1)
    if hasattr(module, cls_name):
        return getattr(module, cls_name)
    for imp in re.finditer(r"from ([\w.]+) import ([^\n]+)", source):
        if re.search(rf"\b{cls_name}\b", imp.group(2)):
            return getattr(importlib.import_module(imp.group(1)), cls_name)
    return None


def _split(argv: list[str], known: dict):
    """(leading bare arguments, config path, {key: value}) as the command's parser reads them."""
    bare = []
    while argv and not argv[0].startswith("--"):
        bare.append(argv.pop(0))
    cfg_path, overrides = config.parse_overrides(argv, known)  # list keys take several values, --no_KEY
    return bare, cfg_path, overrides


@pytest.mark.parametrize("page,no,name,argv", DOC_COMMANDS,
                         ids=[f"{p.relative_to(ROOT)}:{no}:{name}" for p, no, name, _ in DOC_COMMANDS])
def test_documented_command_parses(page, no, name, argv):
    where = f"{page.relative_to(ROOT)}:{no}: tunesmith {name} {' '.join(argv)}"
    assert name in cli.COMMANDS, f"{where}: no such command"
    known, aliases = _keys_and_types(name)
    bare, cfg_path, values = _split(list(argv), known)
    files = [p for p in [cfg_path, *bare] if p and p.endswith((".yaml", ".yml"))]
    for path in files:  # a config of this repository: its keys count too (placeholders such as run.yaml do not)
        if (ROOT / path).is_file():
            if aliases:  # (a command checked by its --help listing, such as plan: its own flags only)
                values = {**config.read_yaml(ROOT / path), **values}
        else:
            assert not path.startswith("examples/"), f"{where}: {path} does not exist"
    for key, value in values.items():
        if key in NOT_KEYS:
            continue
        key = key if key in known else aliases.get(key, key)
        assert key in known, f"{where}: unknown key '{key}'"
        if known[key] is not None:
            config._coerce(value, known[key], f"{where}: field '{key}'")


def test_the_command_finder_reads_what_a_reader_sees():
    text = ("    tunesmith audit --config run.yaml [--show 3]   # comment --not_a_key\n"
            "    pip install -e . && tunesmith demo --quick\n"
            "    torchrun --nproc_per_node 2 -m tunesmith.cli sft --config run.yaml\n"
            "    tunesmith eval --dataset a.jsonl \\\n        --n_tokens 50\n"
            "Run `tunesmith plan CONFIG [--num_gpus 8]` or `tunesmith COMMAND --help` or `tunesmith --help`.\n")
    found = [(no, name, argv) for no, name, argv in _command_lines(text)]
    assert found == [(1, "audit", ["--config", "run.yaml", "--show", "3"]), (2, "demo", ["--quick"]),
                     (3, "sft", ["--config", "run.yaml"]), (4, "eval", ["--dataset", "a.jsonl", "--n_tokens", "50"]),
                     (6, "plan", ["CONFIG", "--num_gpus", "8"])]


def test_a_key_that_no_longer_exists_fails():
    known, aliases = _keys_and_types("sft")
    assert "learning_rate" in known and "lerning_rate" not in known
    assert "neftune_noise_alpha" in known and aliases.get("neftune_alpha") == "neftune_noise_alpha"
    with pytest.raises(config.UserError):
        config._coerce("many", known["num_train_epochs"], "x")


def test_readme_links_every_page_and_links_resolve():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in readme, f"README.md does not link docs/{page.name}"
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)}: link to missing {target}"


def _shell_lines(text: str, program: str) -> list[list[str]]:
    out = []
    for _, code in _code_texts(text):
        for segment in code.split("&&"):
            tokens = shlex.split(segment, comments=True)
            if tokens and tokens[0] == program:
                out.append(tokens[1:])
    return out


def test_the_readme_test_commands_show_progress_and_ci_runs_the_full_one():
    """Issue 23.9: per-file progress (no -q), the slowest tests at the end, a documented quick subset; .ci/run runs
    the README's full command."""
    runs = _shell_lines((ROOT / "README.md").read_text(encoding="utf-8"), "pytest")
    full = [args for args in runs if "-m" not in args]
    quick = [args for args in runs if "-m" in args]
    assert full and quick, runs
    for args in full + quick:
        assert "-q" not in args and any(a.startswith("--durations") for a in args)
    assert quick[0][quick[0].index("-m") + 1] == "not slow"
    import tomllib

    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    assert any(m.startswith("slow:") for m in markers)
    ci = [shlex.split(line, comments=True) for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if "pytest" in line and not line.lstrip().startswith("#")]
    assert len(ci) == 1 and ci[0][:3] == ["python3", "-m", "pytest"]
    assert [a for a in ci[0][3:] if a not in ("-p", "no:cacheprovider")] == full[0]


def test_the_readme_memory_figures_for_a_real_model_are_the_plans():
    """Issue 23.8: the memory the README quotes for trying one's own data is what `tunesmith plan` computes for that
    config, from the model's published config.json copied into examples/models/."""
    from tunesmith.plan import GiB, plan

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    values = config.read_yaml(ROOT / "examples" / "sft_own_data.yaml")
    values["model_name_or_path"] = str(ROOT / "examples" / "models" / "qwen2.5-0.5b-instruct")
    gpu = plan(values)
    cpu = plan({**values, "dtype": "float32", "bf16": False})
    assert 490e6 < gpu["params"] - gpu["trainable"] < 500e6  # Qwen2.5-0.5B: 494M parameters
    assert f"({(gpu['params'] - gpu['trainable']) / 1e6:.0f}M parameters)" in readme
    assert f"({gpu['trainable'] / 1e6:.1f}M trainable)" in readme
    for result in (gpu, cpu):
        assert f"**{result['strategies']['ddp']['total'] / GiB:.1f} GiB**" in readme
