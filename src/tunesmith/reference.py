"""The configuration reference: every command's keys, defaults and help, generated from the config parts.

``tunesmith COMMAND --help`` prints from the committed ``config_reference.json`` (next to this file), so help
needs neither torch nor transformers (TrainingArguments' keys are in it). ``docs/configuration.md`` is generated
from the same data. Both are regenerated at development time::

    python scripts/gen_config_reference.py

and ``tests/test_config.py`` fails while either is stale, so neither can drift from the code. Generation is
deterministic (same code + same transformers -> same bytes). The reference is used only when the installed
transformers is the one it was generated with; otherwise help and the early flag check go through the command's
own parser (slower, never wrong).

Why a generated file and not help built from the config classes at run time: every training command's last part
is ``transformers.TrainingArguments`` (~120 keys, its defaults and help), and importing it imports torch (seconds);
docs/configuration.md has to be generated anyway, so the reference is the same data, built once.
"""
from __future__ import annotations

import json
from functools import cache
from pathlib import Path

REFERENCE = Path(__file__).with_name("config_reference.json")
DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


@cache
def load() -> dict:
    """The committed reference; {} when it is missing or was generated with another transformers than the one
    installed (TrainingArguments' keys differ between versions): help and flag checks then go through the command's
    own parser (slower, never wrong)."""
    from importlib import metadata

    try:
        reference = json.loads(REFERENCE.read_text(encoding="utf-8"))
        installed = metadata.version("transformers")
    except (FileNotFoundError, metadata.PackageNotFoundError):
        return {}
    return reference if reference.get("transformers") == installed else {}


def command_help(name: str) -> str | None:
    """``tunesmith NAME --help``'s text from the committed reference (None for a command it does not hold)."""
    from tunesmith.config import render_help

    entry = load().get("commands", {}).get(name)
    if entry is None:
        return None
    return entry["text"] if "text" in entry else render_help(entry)


def check_flags(name: str, argv: list[str]) -> None:
    """A misspelt ``--flag`` is a one-line error before the command's module (torch, transformers) is imported: the
    flag names against the committed reference's keys, old names and ``--no_KEY`` of boolean keys. Commands the
    reference holds as text only (their own flags) are left to their parser."""
    from tunesmith.config import FLAG, unknown_key_error

    entry = load().get("commands", {}).get(name)
    if entry is None or "groups" not in entry:
        return
    rows = [row for group in entry["groups"] for row in group["keys"]]
    known = {row["key"] for row in rows} | set(entry.get("aliases", {})) | set(entry.get("hidden", [])) | {"config"}
    booleans = {row["key"] for row in rows if "bool" in row["type"].split(" | ")}
    for arg in argv:
        if not arg.startswith("--"):
            continue
        key = arg[2:].partition("=")[0].replace("-", "_")
        if key not in known and not (key.startswith("no_") and key[3:] in booleans):
            raise unknown_key_error(key, known - {"config"}, FLAG, {key: FLAG})


# ------------------------------------------------------------------------------------------ generation (dev time)


def build() -> dict:
    """The reference of every command in ``tunesmith.cli.COMMANDS``, built by asking each for its ``--help``:
    :func:`tunesmith.config.describe`'s data for the commands that parse with ``parse_cli``, the printed text for
    the others. Imports every command module (torch, transformers): run at development time, not at ``--help``."""
    import contextlib
    import importlib
    import io

    import transformers

    from tunesmith.cli import COMMANDS
    from tunesmith.config import collecting_help

    commands = {}
    for name, (module_name, summary) in COMMANDS.items():
        module = importlib.import_module(module_name)
        out = io.StringIO()
        with collecting_help() as seen, contextlib.redirect_stdout(out):
            module.cli(["--help"])
        entry = seen[0] if seen else {"text": out.getvalue()}
        commands[name] = {"summary": summary, **entry}
    return {"generated_by": "scripts/gen_config_reference.py", "transformers": transformers.__version__,
            "commands": commands}


def _anchor(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    import re

    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") if text else ""


def markdown(reference: dict) -> str:
    """docs/configuration.md: the old-name table, then every command's keys grouped by part."""
    lines = ["# Configuration", "",
             "<!-- Generated by scripts/gen_config_reference.py from the config parts: edit the code, not this page "
             "(tests fail while it is stale). -->", "",
             "A config is a YAML file of flat keys; any `--key value` flag overrides it, and `tunesmith COMMAND "
             "--help` lists every key of that command, grouped by the part of the config that owns it (model, data, "
             "LoRA, NEFTune, the recipe's own keys, training). Every `transformers.TrainingArguments` key works in "
             "the training commands. This page lists the same keys, generated from the config parts so that it cannot "
             "drift.", "",
             "On the command line a list key takes every value up to the next flag (`--lora_target_modules q_proj "
             "v_proj`, as TRL writes it) or one comma-separated value; a boolean key is set by its bare flag "
             "(`--packing`) and cleared by `--no_KEY` (`--no_packing`). A misspelt key is an error that names the "
             "flag, or the file and line, and suggests the key meant (`did you mean learning_rate?`).", "",
             "## One set of key names", "",
             "Every command uses the same names for the same thing: `model_name_or_path`, `dataset` / "
             "`eval_dataset`, `dataset_split`, `use_peft`, `lora_target_modules`, `neftune_noise_alpha`. The old "
             "names still work for one release, with a one-line warning naming the new key:", "",
             "| old | new | in |", "|---|---|---|"]
    rows: dict[tuple[str, str], list[str]] = {}
    for name, entry in reference["commands"].items():
        for old, new in entry.get("aliases", {}).items():
            rows.setdefault((old, new), []).append(name)
    lines += [f"| `{old}` | `{new}` | {', '.join(names)} |" for (old, new), names in rows.items()]
    lines += ["", "`tunesmith judge`'s `model` is the judge model's name, a different thing, and keeps its name."]
    lines += ["", "## Commands", ""]
    lines += [f"- [{name}](#{name}): {entry['summary']}" for name, entry in reference["commands"].items()]
    shown: dict[str, str] = {}  # a group of keys already listed (same keys, defaults and help) -> its heading
    for name, entry in reference["commands"].items():
        lines += ["", f"## {name}", ""]
        if "text" in entry:
            lines += ["```text", entry["text"].rstrip("\n"), "```"]
            continue
        lines += [entry["description"], "", "```text", entry["usage"], "```"]
        for group in entry["groups"]:
            heading = f"{name}: {group['title']}" if group["title"] else name
            if group["title"]:
                lines += ["", f"### {heading}", ""]
            else:
                lines += [""]
            same = json.dumps(group["keys"])
            if same in shown:
                lines.append(f"The keys of [{shown[same]}](#{_anchor(shown[same])}), with the same defaults.")
                continue
            shown[same] = heading
            lines += ["| key | default | type | meaning |", "|---|---|---|---|"]
            lines += [f"| `{r['key']}` | `{_cell(r['default']) or chr(34) * 2}` | {_cell(r['type'])} | "
                      f"{_cell(r['help'])} |" for r in group["keys"]]
    return "\n".join(lines) + "\n"


def dumps(value, indent: str = "") -> str:
    """JSON of the reference, one key row (a mapping of plain values) a line, keys in the order the code declares
    them: a changed key shows as one changed line in a diff."""
    inner = indent + " "
    if isinstance(value, dict) and value and any(isinstance(v, (dict, list)) for v in value.values()):
        items = [f"{inner}{json.dumps(k)}: {dumps(v, inner).strip()}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}" + ("\n" if not indent else "")
    if isinstance(value, list) and value and any(isinstance(v, (dict, list)) for v in value):
        items = [inner + dumps(v, inner).strip() for v in value]
        return "[\n" + ",\n".join(items) + f"\n{indent}]"
    return json.dumps(value, ensure_ascii=False)


def write() -> list[Path]:
    """Regenerate config_reference.json and docs/configuration.md; returns the files that changed."""
    from tunesmith.io import atomic_write_text

    reference = build()
    changed = []
    for path, text in ((REFERENCE, dumps(reference)),
                       (DOCS, markdown(reference))):
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            atomic_write_text(path, text)
            changed.append(path)
    load.cache_clear()
    return changed
