"""Classification data: text and label columns, label names and ids, tokenized splits."""
from __future__ import annotations

from typing import Any

from tunesmith.errors import UserError, at


def _scalar_label(value: Any, loc: str, column: str) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise UserError(f"{at(loc, field=column)}: expected a label name or integer, got {value!r}")
    return str(value).strip()


def raw_labels(record, column: str, multi_label: bool) -> list[str]:
    """The label value(s) of one record as strings (multi_label: a list, or a comma-separated string)."""
    if column not in record.data or record.data[column] is None or record.data[column] == "":
        raise UserError(f"{at(record.loc, field=column)}: missing label "
                        f"(columns present: {', '.join(map(str, record.data)) or 'none'})")
    value = record.data[column]
    if not multi_label:
        return [_scalar_label(value, record.loc, column)]
    if isinstance(value, str):
        value = [v for v in (p.strip() for p in value.split(",")) if v]
    if not isinstance(value, (list, tuple)):
        value = [value]
    return [_scalar_label(v, record.loc, column) for v in value]


def label_names(data, train_records) -> list[str]:
    """Label names in id order: declared in the config's data part (``data``), or the training data's distinct
    labels, sorted."""
    seen: dict[str, None] = {}
    for r in train_records:
        for v in raw_labels(r, data.label_column, data.multi_label):
            seen.setdefault(v, None)
    if data.labels is not None:
        names = [str(n) for n in data.labels]
        if len(names) < 2:
            raise UserError(f"field 'labels': a classifier needs at least two labels, got {names}")
        used = {names[label_id(v, names, r.loc, data.label_column)] for r in train_records
                for v in raw_labels(r, data.label_column, data.multi_label)}
    else:
        numeric = all(v.lstrip("-").isdigit() for v in seen)
        names = sorted(seen, key=(lambda v: int(v)) if numeric else None)
        used = set(names)
    if len(used) < 2:
        only = ", ".join(sorted(used)) or "none"
        from tunesmith.data.source import describe

        raise UserError(f"{describe(data.dataset)}: the training data has only one class ({only}); "
                        f"a classifier needs examples of at least two labels")
    return names


def label_id(value: str, names: list[str], loc: str, column: str) -> int:
    if value in names:
        return names.index(value)
    if value.isdigit() and int(value) < len(names):
        return int(value)
    raise UserError(f"{at(loc, field=column)}: label {value!r} is not one of the labels ({', '.join(names)})")


def text_of(record, column: str) -> str:
    value = record.data.get(column)
    if column not in record.data:
        raise UserError(f"{at(record.loc, field=column)}: missing text column "
                        f"(columns present: {', '.join(map(str, record.data)) or 'none'})")
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{at(record.loc, field=column)}: expected non-empty text, got {value!r}")
    return value


def encode_split(data, records, names: list[str]) -> tuple[list[str], list]:
    """Texts and label targets (an id, or a multi-hot float vector); ``data``: the config's data part."""
    texts, targets = [], []
    for r in records:
        texts.append(text_of(r, data.text_column))
        ids = [label_id(v, names, r.loc, data.label_column) for v in raw_labels(r, data.label_column, data.multi_label)]
        if data.multi_label:
            hot = [0.0] * len(names)
            for i in ids:
                hot[i] = 1.0
            targets.append(hot)
        else:
            targets.append(ids[0])
    return texts, targets


def tokenized_dataset(tokenizer, texts: list[str], targets: list, max_length: int):
    import datasets

    enc = tokenizer(texts, truncation=True, max_length=max_length)
    return datasets.Dataset.from_dict({**{k: v for k, v in enc.items()}, "labels": targets})


def load_split(value, split: str, key: str = "dataset", sources=None):
    """The records of a dataset value (the one data entry: files, pipes, pkg:, hub; a list is concatenated);
    ``sources``: its sources, when already opened."""
    from tunesmith.data.source import read_records

    return read_records(value, split=split, key=key, sources=sources) if value else None


