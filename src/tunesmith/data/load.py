"""Reading one source's records: local JSON / JSONL / CSV / Parquet files (streamed where the format allows) and
the rows of a loaded hub split, each record with its location (file:line or file: row N) so every later error can
name it. Only :mod:`tunesmith.data.source` (the one data entry) calls these; commands go through it."""
from __future__ import annotations

import csv
import json
import os
import re
import sys
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


def _read_text(path: Path, name: str) -> str:
    return "".join(_lines(path, keepends=True, name=name))


def _lines(path: Path, keepends: bool = False, name: str | None = None):
    """The file's lines (split on \\n only), decoded as UTF-8 one at a time, so memory stays flat on large files.
    A UTF-8 error names the line and byte offset."""
    name = str(path) if name is None else name
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"{name}: cannot read ({e.strerror or e})") from None
    with f:
        offset = 0
        for n, raw in enumerate(f, start=1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark
                raw, offset = raw[3:], 3
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{name}:{n}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset "
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
    try:
        found = _find_surrogate(obj)
    except RecursionError:
        raise UserError(f"{loc}: JSON nested too deeply") from None
    if found:
        field, escape = found
        raise UserError(f"{loc}: field '{field}': lone surrogate escape {escape} (half of a UTF-16 pair, not a "
                        f"character); fix the text's encoding")


def json_loads(text: str, loc: str):
    """``json.loads`` with one-line errors naming ``loc``: malformed JSON, and JSON nested deeper than Python can
    decode (a RecursionError otherwise)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{loc}: malformed JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise UserError(f"{loc}: JSON nested too deeply (more than about {sys.getrecursionlimit()} levels)") from None


def _jsonl(path: Path, name: str):
    for n, line in enumerate(_lines(path, name=name), start=1):
        if not line.strip():
            continue
        obj = json_loads(line, f"{name}:{n}")
        if not isinstance(obj, dict):
            raise UserError(f"{name}:{n}: expected a JSON object per line, got {type(obj).__name__}")
        if may_hold_surrogates(line):
            check_text(obj, f"{name}:{n}")
        yield Record(obj, f"{name}:{n}")


def _json(path: Path, name: str):
    text = _read_text(path, name)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        # Perhaps it is JSON Lines with a .json suffix.
        if text.lstrip().startswith("{") and "\n" in text.strip():
            del text
            yield from _jsonl(path, name)
            return
        raise UserError(f"{name}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise UserError(f"{name}: JSON nested too deeply (more than about {sys.getrecursionlimit()} levels)") from None
    check = may_hold_surrogates(text)
    del text
    if isinstance(obj, dict):
        # {"data": [...]} / {"train": [...]} wrappers are common; a single object is one record.
        lists = [v for v in obj.values() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
        obj = lists[0] if len(lists) == 1 else [obj]
    if not isinstance(obj, list):
        raise UserError(f"{name}: expected a JSON array of objects, got {type(obj).__name__}")
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            raise UserError(f"{name}: row {i}: expected an object, got {type(item).__name__}")
        if check:
            check_text(item, f"{name}: row {i}")
        yield Record(item, f"{name}: row {i}")


def _csv(path: Path, name: str):
    # The csv module refuses a field over 131,072 characters by default; a long document is valid data.
    limit = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.DictReader(_lines(path, keepends=True, name=name))
    try:
        for row in reader:
            if None in row:
                raise UserError(f"{name}:{reader.line_num}: more values than header columns")
            yield Record({k: v for k, v in row.items()}, f"{name}:{reader.line_num}")
    except csv.Error as e:
        raise UserError(f"{name}:{reader.line_num}: malformed CSV ({e})") from None
    finally:
        csv.field_size_limit(limit)


def _parquet(path: Path, name: str):
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1000)
        i = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield Record(row, f"{name}: row {i}")
                i += 1
    except UserError:
        raise
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise UserError(f"{name}: cannot read Parquet ({first_line(e)})") from None


READERS = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet}


def read_file(path: Path, kind: str, name: str | None = None):
    """The records of a local file of type ``kind`` (a suffix: .jsonl, .json, .csv or .parquet), streamed where the
    type allows; ``name`` is what locations show (default: the path)."""
    return READERS[kind](Path(path), str(path) if name is None else name)


def sniff_kind(head: bytes) -> str:
    """The file type of data whose name says nothing (a pipe): Parquet by its magic bytes, a JSON array, JSON Lines
    (an object first), else CSV."""
    if head.startswith(b"PAR1"):
        return ".parquet"
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    if text.startswith(b"["):
        return ".json"
    if text.startswith(b"{"):
        return ".jsonl"
    return ".csv"


def load_hub(name: str, split: str):
    """The split of a Hugging Face dataset (loaded once; raises a one-line error with an offline hint)."""
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as e:
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (offline mode: set TUNESMITH_ONLINE=1 to allow hub downloads)" if offline else ""
        raise UserError(f"{name}: not a local file and could not be loaded as a dataset{hint}: "
                        f"{first_line(e)}") from None


def hub_records(ds, name: str, split: str):
    for i, row in enumerate(ds):
        yield Record(dict(row), f"{name}[{split}]: row {i}")


def resolve_file(source: str | os.PathLike, split: str = "train") -> Path | None:
    """The local file ``source`` names (a directory must hold one file whose name contains ``split``), or None for
    a hub dataset name. A pipe or other non-regular file (``<(cat a.jsonl)``) is returned as it is: its type is
    read from its first bytes."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and split in p.stem)
        if len(files) != 1:
            raise UserError(f"{path}: a directory must hold exactly one data file whose name contains '{split}'")
        path = files[0]
    if path.exists() and not path.is_file():  # a pipe, a character device
        return path
    if path.suffix in SUFFIXES or path.exists():
        if not path.exists():
            raise UserError(f"{path}: file not found")
        if path.suffix not in SUFFIXES:
            raise UserError(f"{path}: unknown file type '{path.suffix}' (use .json, .jsonl, .csv or .parquet)")
        return path
    return None
