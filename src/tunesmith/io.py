"""Crash-safe file writes: write to a temp file in the same directory, fsync, rename."""
from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path

from tunesmith.errors import UserError


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the mode a plain open() would
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | Path, rows) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def resolve_path(value: str) -> str:
    """``pkg:PACKAGE/sub/path`` -> the path inside the installed package; anything else unchanged."""
    if not value.startswith("pkg:"):
        return value
    package, _, rest = value[len("pkg:"):].partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"{value}: no installed Python package named '{package}'")
    path = Path(list(spec.submodule_search_locations)[0]) / rest
    if not path.exists():
        raise UserError(f"{value}: '{rest}' does not exist inside package '{package}' ({path})")
    return str(path)

