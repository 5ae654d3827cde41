"""Load records from local JSON / JSONL / CSV / Parquet files or a Hugging Face dataset, keeping each record's
location (file:line or file:row) so every later error can name it."""
from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import UserError, first_line

SUFFIXES = {".json", ".jsonl", ".csv", ".parquet"}
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # JSON text that may decode to a surrogate code point
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Record:
    data: dict
    loc: str  # "path:line" (JSONL/CSV), "path:row N" (JSON array, Parquet) or "dataset[split]:row N"


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None


def _printable(key) -> str:
    return str(key).encode("utf-8", "backslashreplace").decode("utf-8")


def _find_surrogate(value, where: str = "") -> tuple[str, str] | None:
    """(field path, the escape) of the first string in ``value`` holding a lone surrogate, else None."""
    if isinstance(value, str):
        m = _SURROGATE.search(value)
        return (where, f"\\u{ord(m.group()):04x}") if m else None
    if isinstance(value, dict):
        items = ((f"{where}.{_printable(k)}" if where else _printable(k), k, v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"{where}[{i}]", None, v) for i, v in enumerate(value))
    else:
        return None
    for name, key, v in items:
        found = _find_surrogate(key, name) if isinstance(key, str) else None
        found = found or _find_surrogate(v, name)
        if found:
            return found
    return None


def may_hold_surrogates(json_text: str) -> bool:
    """Cheap pre-check for :func:`check_text`: only a ``\\udXXX`` escape in JSON text decodes to a surrogate."""
    return _SURROGATE_ESCAPE.search(json_text) is not None


def check_text(obj, loc: str) -> None:
    """JSON may spell a lone surrogate (``\\ud800``): not a character, it breaks tokenizers and UTF-8 writes later.
    Raise a one-line error naming the location and field."""
    found = _find_surrogate(obj)
    if found:
        field, escape = found
        raise UserError(f"{loc}: field '{field}': lone surrogate escape {escape} (half of a UTF-16 pair, not a "
                        f"character); fix the text's encoding")


def _jsonl(path: Path) -> list[Record]:
    out = []
    for n, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{n}: expected a JSON object per line, got {type(obj).__name__}")
        if may_hold_surrogates(line):
            check_text(obj, f"{path}:{n}")
        out.append(Record(obj, f"{path}:{n}"))
    return out


def _json(path: Path) -> list[Record]:
    text = _read_text(path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        # Perhaps it is JSON Lines with a .json suffix.
        if text.lstrip().startswith("{") and "\n" in text.strip():
            return _jsonl(path)
        raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(obj, dict):
        # {"data": [...]} / {"train": [...]} wrappers are common; a single object is one record.
        lists = [v for v in obj.values() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
        obj = lists[0] if len(lists) == 1 else [obj]
    if not isinstance(obj, list):
        raise UserError(f"{path}: expected a JSON array of objects, got {type(obj).__name__}")
    out = []
    check = may_hold_surrogates(text)
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            raise UserError(f"{path}: row {i}: expected an object, got {type(item).__name__}")
        if check:
            check_text(item, f"{path}: row {i}")
        out.append(Record(item, f"{path}: row {i}"))
    return out


def _csv(path: Path) -> list[Record]:
    text = _read_text(path)
    reader = csv.DictReader(text.splitlines())
    out = []
    try:
        for row in reader:
            if None in row:
                raise UserError(f"{path}:{reader.line_num}: more values than header columns")
            out.append(Record({k: v for k, v in row.items()}, f"{path}:{reader.line_num}"))
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    return out


def _parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise UserError(f"{path}: cannot read Parquet ({first_line(e)})") from None
    return [Record(row, f"{path}: row {i}") for i, row in enumerate(table.to_pylist())]


def _hub(name: str, split: str) -> list[Record]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (offline mode: set TUNESMITH_ONLINE=1 to allow hub downloads)" if offline else ""
        raise UserError(f"{name}: not a local file and could not be loaded as a dataset{hint}: "
                        f"{first_line(e)}") from None
    return [Record(dict(row), f"{name}[{split}]: row {i}") for i, row in enumerate(ds)]


def load_records(source: str | os.PathLike, split: str = "train") -> list[Record]:
    """Read every record of ``source``. Raises UserError (naming the file and line) on any problem."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and split in p.stem)
        if len(files) != 1:
            raise UserError(f"{path}: a directory must hold exactly one data file whose name contains '{split}'")
        path = files[0]
    if path.suffix in SUFFIXES or path.exists():
        if not path.exists():
            raise UserError(f"{path}: file not found")
        reader = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet}.get(path.suffix)
        if reader is None:
            raise UserError(f"{path}: unknown file type '{path.suffix}' (use .json, .jsonl, .csv or .parquet)")
        records = reader(path)
    else:
        records = _hub(str(source), split)
    if not records:
        raise UserError(f"{source}: the dataset is empty")
    return records
