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
    return "".join(_lines(path, keepends=True))


def _lines(path: Path, keepends: bool = False):
    """The file's lines (split on \\n only), decoded as UTF-8 one at a time, so memory stays flat on large files.
    A UTF-8 error names the line and byte offset."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        offset = 0
        for n, raw in enumerate(f, start=1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark
                raw, offset = raw[3:], 3
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{n}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset "
                                f"{offset + e.start})") from None
            offset += len(raw)
            yield line if keepends else line.rstrip("\r\n")


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


def _jsonl(path: Path):
    for n, line in enumerate(_lines(path), start=1):
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
        yield Record(obj, f"{path}:{n}")


def _json(path: Path):
    text = _read_text(path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        # Perhaps it is JSON Lines with a .json suffix.
        if text.lstrip().startswith("{") and "\n" in text.strip():
            del text
            yield from _jsonl(path)
            return
        raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    check = may_hold_surrogates(text)
    del text
    if isinstance(obj, dict):
        # {"data": [...]} / {"train": [...]} wrappers are common; a single object is one record.
        lists = [v for v in obj.values() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
        obj = lists[0] if len(lists) == 1 else [obj]
    if not isinstance(obj, list):
        raise UserError(f"{path}: expected a JSON array of objects, got {type(obj).__name__}")
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            raise UserError(f"{path}: row {i}: expected an object, got {type(item).__name__}")
        if check:
            check_text(item, f"{path}: row {i}")
        yield Record(item, f"{path}: row {i}")


def _csv(path: Path):
    reader = csv.DictReader(_lines(path, keepends=True))
    try:
        for row in reader:
            if None in row:
                raise UserError(f"{path}:{reader.line_num}: more values than header columns")
            yield Record({k: v for k, v in row.items()}, f"{path}:{reader.line_num}")
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None


def _parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1000)
        i = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield Record(row, f"{path}: row {i}")
                i += 1
    except UserError:
        raise
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise UserError(f"{path}: cannot read Parquet ({first_line(e)})") from None


def _hub(name: str, split: str):
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (offline mode: set TUNESMITH_ONLINE=1 to allow hub downloads)" if offline else ""
        raise UserError(f"{name}: not a local file and could not be loaded as a dataset{hint}: "
                        f"{first_line(e)}") from None
    for i, row in enumerate(ds):
        yield Record(dict(row), f"{name}[{split}]: row {i}")


def load_records(source: str | os.PathLike, split: str = "train") -> list[Record]:
    """Read every record of ``source``. Raises UserError (naming the file and line) on any problem."""
    return list(iter_records(source, split))


def resolve_file(source: str | os.PathLike, split: str = "train") -> Path | None:
    """The local file ``source`` names (a directory must hold one file whose name contains ``split``), or None for
    a hub dataset name."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and split in p.stem)
        if len(files) != 1:
            raise UserError(f"{path}: a directory must hold exactly one data file whose name contains '{split}'")
        path = files[0]
    if path.suffix in SUFFIXES or path.exists():
        if not path.exists():
            raise UserError(f"{path}: file not found")
        if path.suffix not in SUFFIXES:
            raise UserError(f"{path}: unknown file type '{path.suffix}' (use .json, .jsonl, .csv or .parquet)")
        return path
    return None


def iter_records(source: str | os.PathLike, split: str = "train"):
    """Yield the records of ``source`` one at a time (JSONL, CSV and Parquet are streamed; a JSON array is read
    whole). Raises UserError (naming the file and line) on any problem, and for a dataset with no record."""
    path = resolve_file(source, split)
    if path is not None:
        records = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet}[path.suffix](path)
    else:
        records = _hub(str(source), split)
    empty = True
    for record in records:
        empty = False
        yield record
    if empty:
        raise UserError(f"{source}: the dataset is empty")
