"""The one way in for data: every command that reads a dataset (sft, audit, spin, dpo, classify, eval, generate)
opens it here, and nowhere else.

A dataset value (the ``dataset`` / ``eval_dataset`` / ``prompts`` keys) is one source or a list of them:

* a string: a local ``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet`` file, a directory holding one file per split, a
  pipe (``<(zcat data.jsonl.gz)``), ``pkg:PACKAGE/path`` (a file shipped in an installed package) or a hub dataset
  name; a comma-separated string is a list (``a.jsonl,b.jsonl``) unless it names an existing file;
* a mapping ``{path, split, format, template, weight, num_samples, name}`` (only ``path`` is required);
* a list of either.

:func:`open_sources` parses the value and resolves every source ONCE (:class:`DataSource`: ``pkg:`` and directories
resolved, a pipe spooled to a temporary file, a hub split loaded), then each source hands out what a command needs:

* ``source.records()`` — raw records with their location (file:line), streamed;
* ``source.examples(require_response)`` — normalised :class:`~tunesmith.data.formats.Example` objects, streamed;
* ``source.tokenized(tokenizer, template, max_length, ...)`` — masked token rows on memory-mapped Arrow, cached by
  a fingerprint of the data's bytes, the tokenizer, the template and the settings (:mod:`tunesmith.data.prepare`);
* ``source.mapped(function, key=..., ...)`` — any other batched map over the normalised examples, cached the same
  way (what SPIN and DPO build their prompt and pair tables with).

Over several sources: :func:`tokenize_sources` (token rows of a mixture, ``concat`` or ``interleave`` by weight,
deterministic under a seed; each source is cached on its own), :func:`read_examples` and :func:`read_records`
(the same selection, in memory, for prompts and labelled records), and :func:`template_for` (``template: auto``).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import os
import re
import tempfile
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tunesmith.data.formats import FORMATS, Example, detect_format, to_example
from tunesmith.data.load import Record, hub_records, load_hub, read_file, resolve_file, sniff_kind
from tunesmith.errors import UserError

log = logging.getLogger("tunesmith")

SOURCE_KEYS = ("path", "split", "format", "template", "weight", "num_samples", "name")
MIXTURES = ("concat", "interleave")


@dataclass(frozen=True)
class SourceSpec:
    """One source as the user wrote it (``format``/``split``/``template`` None: the command's setting)."""

    path: str
    split: str | None = None
    format: str | None = None
    template: str | None = None
    weight: float | None = None
    num_samples: int | None = None
    name: str | None = None


def check_format(name: str, where: str = "dataset_format") -> None:
    if name not in ("auto",) + FORMATS:
        raise UserError(f"unknown {where} '{name}' (choose auto, {', '.join(FORMATS)})")


def _split_commas(value: str) -> list[str]:
    if "," not in value or Path(value).exists():
        return [value]
    return [part.strip() for part in value.split(",")]


def _spec(item, where: str) -> SourceSpec:
    if isinstance(item, os.PathLike):
        item = os.fspath(item)
    if isinstance(item, str):
        if not item.strip():
            raise UserError(f"{where}: an empty source name")
        return SourceSpec(item.strip())
    if not isinstance(item, dict):
        raise UserError(f"{where}: a source is a path or a mapping with 'path', got {item!r}")
    unknown = [k for k in item if k not in SOURCE_KEYS]
    if unknown:
        raise UserError(f"{where}: unknown key '{unknown[0]}' (a source takes {', '.join(SOURCE_KEYS)})")
    if not isinstance(item.get("path"), str) or not item["path"].strip():
        raise UserError(f"{where}: 'path' is required (a file, pkg:PACKAGE/path or a hub dataset name)")
    for key in ("split", "format", "template", "name"):
        if item.get(key) is not None and not isinstance(item[key], str):
            raise UserError(f"{where}.{key}: expected a string, got {item[key]!r}")
    if item.get("format") is not None:
        check_format(item["format"], f"{where}.format")
    weight, n = item.get("weight"), item.get("num_samples")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))
                               or not math.isfinite(weight) or weight <= 0):
        raise UserError(f"{where}.weight: must be a number > 0, got {weight!r}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise UserError(f"{where}.num_samples: must be an integer >= 1, got {n!r}")
    return SourceSpec(item["path"].strip(), item.get("split"), item.get("format"), item.get("template"),
                      None if weight is None else float(weight), n, item.get("name"))


def parse_sources(value, key: str = "dataset") -> list[SourceSpec]:
    """The sources of a dataset value (see the module docstring); [] for None or empty. One-line errors name
    ``key`` and the source's position."""
    if value is None or value == "" or value == []:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    flat = []
    for item in items:
        flat += _split_commas(item) if isinstance(item, str) else [item]
    specs = []
    for i, item in enumerate(flat):
        specs.append(_spec(item, f"field '{key}'" if len(flat) == 1 else f"field '{key}[{i}]'"))
    return specs


def check_sources(value, key: str = "dataset", mixture: str | None = None, weights: bool = True) -> None:
    """Config-time checks of a dataset value: its shape, the mixture name, weights only where they mean something."""
    specs = parse_sources(value, key)
    if mixture is not None and mixture not in MIXTURES:
        raise UserError(f"field 'mixture': must be one of {', '.join(MIXTURES)}, got {mixture!r}")
    weighted = [s for s in specs if s.weight is not None]
    if weighted and not weights:
        raise UserError(f"field '{key}': 'weight' has no meaning here (each source is used whole)")
    if weighted and mixture == "concat":
        raise UserError(f"field '{key}': 'weight' needs mixture: interleave (concat takes every example of every "
                        "source; num_samples takes more or fewer of one)")


def describe(value) -> str:
    """A dataset value in a few words: its sources' paths joined by ' + '."""
    return " + ".join(s.path for s in parse_sources(value))


def source_names(specs: list[SourceSpec]) -> list[str]:
    """A short, distinct name per source: its ``name``, else the file's stem or the hub name's last part."""
    names, seen = [], {}
    for s in specs:
        base = s.name or Path(s.path.rstrip("/")).stem or s.path
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("_") or "data"
        k = seen[base] = seen.get(base, 0) + 1
        names.append(base if k == 1 else f"{base}-{k}")
    return names


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where tokenized data is cached: ``cache_dir``, else ``tunesmith/`` in the Hugging Face datasets cache."""
    if cache_dir:
        return Path(cache_dir)
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "tunesmith"


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


class DataSource:
    """One resolved source. ``name`` is its short name (metrics, summaries); ``display`` what locations show."""

    def __init__(self, spec: SourceSpec, name: str, split: str = "train", dataset_format: str = "auto",
                 cache_dir: str | os.PathLike | None = None):
        from tunesmith.io import resolve_path

        self.spec, self.name = spec, name
        self.split = spec.split or split
        self.format_option = spec.format or dataset_format
        check_format(self.format_option)
        self.location = resolve_path(spec.path)
        path = resolve_file(self.location, self.split)
        self.path: Path | None = None
        self.kind: str | None = None
        self.display = spec.path
        self._digest: str | None = None
        if path is not None and path.is_file():
            self.path, self.kind, self.display = path, path.suffix, str(path)
        elif path is not None:
            self._spool(path, cache_dir)

    def __repr__(self) -> str:
        return f"DataSource({self.display!r}, split={self.split!r}, format={self.format_option!r})"

    def _spool(self, path: Path, cache_dir) -> None:
        """A pipe can be read once: copy it to a temporary file (beside the cache), hashing it on the way."""
        root = cache_root(cache_dir)
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=root, prefix=".spool-")
        weakref.finalize(self, _remove, tmp)
        h, head = hashlib.sha256(), b""
        try:
            with open(path, "rb") as src, os.fdopen(fd, "wb") as dst:
                while chunk := src.read(1 << 23):
                    head = head or chunk[:64]
                    h.update(chunk)
                    dst.write(chunk)
        except OSError as e:
            raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
        self.path, self.kind, self._digest = Path(tmp), sniff_kind(head), h.hexdigest()

    @functools.cached_property
    def hub(self):
        """The hub dataset's split, loaded once (None for a local file)."""
        return None if self.path is not None else load_hub(self.location, self.split)

    @functools.cached_property
    def fingerprint(self) -> str:
        """The identity of the data itself: a hash of a file's bytes, or datasets' fingerprint of a hub split."""
        if self._digest is None:
            if self.path is None:
                self._digest = self.hub._fingerprint
            else:
                h = hashlib.sha256()
                with open(self.path, "rb") as f:
                    while chunk := f.read(1 << 23):
                        h.update(chunk)
                self._digest = h.hexdigest()
        return self._digest

    def records(self) -> Iterator[Record]:
        """Every record with its location, streamed (a JSON array is read whole). An empty dataset is an error."""
        if self.path is not None:
            records = read_file(self.path, self.kind, self.display)
        else:
            records = hub_records(self.hub, self.location, self.split)
        empty = True
        for record in records:
            empty = False
            yield record
        if empty:
            raise UserError(f"{self.display}: the dataset is empty")

    @functools.cached_property
    def first_record(self) -> Record:
        with contextlib.closing(self.records()) as records:
            return next(records)

    @functools.cached_property
    def format(self) -> str:
        """The data format: ``format`` / ``dataset_format`` when set, else detected from the first record."""
        if self.format_option != "auto":
            return self.format_option
        return detect_format(self.first_record.data, self.first_record.loc)

    @property
    def conversational(self) -> bool:
        """Chat data: messages, ShareGPT conversations, or prompt/completion given as message lists."""
        if self.format in ("messages", "sharegpt"):
            return True
        return self.format == "prompt_completion" and isinstance(self.first_record.data.get("prompt"), list)

    def examples(self, require_response: bool = True) -> Iterator[Example]:
        """Every record as a normalised example, streamed; a bad record stops with its file:line and field."""
        fmt = self.format
        for record in self.records():
            yield to_example(record, fmt, require_response)

    def tokenized(self, tokenizer, template, max_length: int, *, train_on_prompt: bool = False,
                  num_proc: int | None = None, cache_dir: str | os.PathLike | None = None):
        """``(TokenizedData, DataSummary)``: the masked token rows (memory-mapped, cached) and their summary."""
        from tunesmith.data.prepare import tokenize_source

        return tokenize_source(self, tokenizer, template, max_length, train_on_prompt=train_on_prompt,
                               num_proc=num_proc, cache_dir=cache_dir)

    def mapped(self, function, *, key: dict, features, tokenizer=None, fn_kwargs: dict | None = None,
               require_response: bool = True, num_proc: int | None = None,
               cache_dir: str | os.PathLike | None = None, desc: str | None = None, finish=None, normalise=None):
        """``(datasets.Dataset, manifest)``: ``function`` mapped (batched) over the normalised examples (or over
        ``normalise``'s rows of the records), cached.

        See :func:`tunesmith.data.prepare.cached_map` for the arguments; ``key`` must hold every setting that changes
        the output (the data's bytes, the tokenizer and ``require_response`` are added)."""
        from tunesmith.data.prepare import cached_map

        return cached_map(self, function, key=key, features=features, tokenizer=tokenizer, fn_kwargs=fn_kwargs,
                          require_response=require_response, num_proc=num_proc, cache_dir=cache_dir, desc=desc,
                          finish=finish, normalise=normalise)

    def template(self, default, tokenizer):
        """The template this source is rendered with: its own ``template`` when given, else ``default``."""
        if not self.spec.template:
            return default
        from tunesmith.data.templates import resolve_template

        return resolve_template(self.spec.template, tokenizer, self.conversational)


def open_sources(value, *, split: str = "train", dataset_format: str = "auto", key: str = "dataset",
                 cache_dir: str | os.PathLike | None = None) -> list[DataSource]:
    """Every source of a dataset value, resolved once. ``split`` / ``dataset_format``: the command's settings,
    which a source's own ``split`` / ``format`` override."""
    specs = parse_sources(value, key)
    if not specs:
        raise UserError(f"field '{key}' is required")
    return [DataSource(s, n, split, dataset_format, cache_dir) for s, n in zip(specs, source_names(specs))]


def data_identity(sources: list[DataSource]) -> list[str]:
    """What names the sources' data in a run's fingerprint, so that a resume on changed data is refused: a local
    file's byte digest (computed once: the data cache reuses it); a hub dataset by its name and split."""
    return [s.fingerprint if s.path is not None else f"{s.display}:{s.split}" for s in sources]


def open_source(value, **kwargs) -> DataSource:
    """The one source of ``value`` (a list of several is an error)."""
    sources = open_sources(value, **kwargs)
    if len(sources) != 1:
        raise UserError(f"field '{kwargs.get('key', 'dataset')}': expected one source, got {len(sources)}")
    return sources[0]


def template_for(name: str, tokenizer, sources: list[DataSource]):
    """The run's template. ``auto``: the tokenizer's chat template when it has one and the data is conversational
    (messages, ShareGPT, prompt/completion message lists), else alpaca."""
    from tunesmith.data.templates import resolve_template

    conversational = name == "auto" and any(s.conversational for s in sources)
    template = resolve_template(name, tokenizer, conversational)
    if name == "auto":
        why = ("conversational data, the tokenizer's chat template" if template.name == "chat" else
               "conversational data, but the tokenizer has no chat template" if conversational else
               "instruction data")
        log.info(f"template auto: {template.spec()} ({why})")
    return template


def model_template(name: str, model_dir: str, tokenizer, sources: list[DataSource]):
    """The template of a command that runs a trained model (generate, eval): ``name`` when given (``auto`` resolved
    against ``sources``), else the template saved with the model, else ``auto`` (a model not trained by tunesmith)."""
    from tunesmith.data.templates import TEMPLATE_FILE, load_saved_template

    if name:
        return template_for(name, tokenizer, sources)
    if (Path(model_dir) / TEMPLATE_FILE).exists():
        return load_saved_template(model_dir, tokenizer)
    template = template_for("auto", tokenizer, sources)
    log.warning(f"note: {model_dir} has no {TEMPLATE_FILE} (not trained by tunesmith): template auto gives "
                f"{template.spec()}; set template to choose another")
    return template


# ------------------------------------------------------------------------------------------------ several sources


def tokenize_sources(sources: list[DataSource], tokenizer, template, max_length: int, *, mixture: str = "concat",
                     seed: int = 0, train_on_prompt: bool = False, num_proc: int | None = None,
                     cache_dir: str | os.PathLike | None = None):
    """``(rows, MixtureSummary)``: the token rows of ``sources`` mixed by ``mixture`` (each source tokenized and
    cached on its own, with its own template when it names one). ``rows`` is a ``TokenizedData`` for one source
    taken whole, else a :class:`~tunesmith.data.mixture.MixedRows` view; both index like a list of
    ``{input_ids, labels}`` dicts and carry ``lengths``."""
    import numpy as np

    from tunesmith.data.mixture import MixedRows, MixtureSummary, plan

    parts, summaries = [], []
    for s in sources:
        data, summary = s.tokenized(tokenizer, s.template(template, tokenizer), max_length,
                                    train_on_prompt=train_on_prompt, num_proc=num_proc, cache_dir=cache_dir)
        parts.append(data)
        summaries.append(summary)
    src, row = plan([len(p) for p in parts], [s.spec for s in sources], mixture, seed)
    whole = len(parts) == 1 and len(row) == len(parts[0]) and bool((row == np.arange(len(row))).all())
    rows = parts[0] if whole else MixedRows(parts, src, row)
    return rows, MixtureSummary(summaries, [s.name for s in sources], src, mixture, seed)


def _select(lists: list[list], sources: list[DataSource], mixture: str, seed: int) -> list:
    from tunesmith.data.mixture import plan

    src, row = plan([len(x) for x in lists], [s.spec for s in sources], mixture, seed)
    return [lists[k][i] for k, i in zip(src.tolist(), row.tolist())]


def read_examples(value, *, split: str = "train", dataset_format: str = "auto", require_response: bool = True,
                  key: str = "dataset", mixture: str = "concat", seed: int = 0, limit: int | None = None,
                  sources: list[DataSource] | None = None) -> list[Example]:
    """The normalised examples of a dataset value, in memory (prompts to generate from, references): the sources'
    examples selected as :func:`tokenize_sources` selects rows. ``limit``: only the first N (read no further)."""
    sources = sources or open_sources(value, split=split, dataset_format=dataset_format, key=key)
    plain = mixture == "concat" and all(s.spec.num_samples is None for s in sources)
    if plain and limit:
        import itertools

        chained = itertools.chain.from_iterable(s.examples(require_response) for s in sources)
        return list(itertools.islice(chained, limit))
    examples = _select([list(s.examples(require_response)) for s in sources], sources, mixture, seed)
    return examples[:limit] if limit else examples


def read_records(value, *, split: str = "train", key: str = "dataset", mixture: str = "concat",
                 seed: int = 0, sources: list[DataSource] | None = None) -> list[Record]:
    """The raw records of a dataset value (classification's text and label columns), selected as
    :func:`tokenize_sources` selects rows. ``sources``: the value's sources, when already opened."""
    sources = sources or open_sources(value, split=split, key=key)
    return _select([list(s.records()) for s in sources], sources, mixture, seed)
