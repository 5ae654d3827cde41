"""Crash-safe file writes: write to a temp file in the same directory, fsync, rename; pkg: path resolution.

Temporary names carry the writer's host and pid (:func:`tunesmith.rundir.temp_prefix`), so the next run in that
place can remove what a killed writer left (:func:`tunesmith.rundir.clean_stale_temps`). Written files get the mode
a plain ``open()`` would give them under the umask."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import tempfile
from pathlib import Path

from tunesmith.errors import UserError


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a directory and everything in it) the modes plain ``open()`` / ``mkdir()`` would:
    temp files and directories (``mkstemp``, ``mkdtemp``, safetensors' writer) are created 0600 / 0700."""
    path, mask = Path(path), umask()
    if path.is_dir():
        for root, _dirs, files in os.walk(path):
            os.chmod(root, 0o777 & ~mask)
            for f in files:
                if not os.path.islink(os.path.join(root, f)):
                    os.chmod(os.path.join(root, f), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, command: str | None = None):
    """Yield a temporary path beside ``path`` to write to (by any library); on success it is fsynced and renamed to
    ``path``, with the umask's mode; on failure it is removed. ``command``: record the file as that command's output
    (:func:`tunesmith.rundir.record_output`)."""
    from tunesmith.rundir import record_output, temp_prefix

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name), suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        follow_umask(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if command is not None:
        record_output(path, command)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, command: str | None = None) -> None:
    with atomic_path(path, command) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, command: str | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), command)


def atomic_write_json(path: str | os.PathLike, obj, command: str | None = None) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n", command)


def atomic_write_jsonl(path: str | os.PathLike, rows, command: str | None = None) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), command)


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
