"""Tokenized, masked examples on memory-mapped Arrow, cached: the engine behind
:meth:`tunesmith.data.source.DataSource.tokenized` (and :meth:`~tunesmith.data.source.DataSource.mapped`).

1. the source's records are read one at a time (JSONL, CSV and Parquet are streamed), checked and normalised into
   :class:`~tunesmith.data.formats.Example` shape — every bad record stops the run with its file:line error — and
   written to an Arrow file in batches, so no list of a million Python objects is ever held;
2. ``datasets.Dataset.map`` runs the stage's function (tokenization, or a recipe's own) over that file in batches
   (``dataset_num_proc`` processes) into memory-mapped Arrow files;
3. the result is cached under a fingerprint of the data's bytes, the tokenizer, and the stage's settings (for
   tokenization: the template, ``max_length``, ``train_on_prompt`` and the data format): the next run with the same
   inputs (and every other process of a distributed run, which waits for the node's main process) only maps the
   cached files.

The cache lives in ``cache_dir`` (default: ``tunesmith/`` inside the Hugging Face datasets cache, i.e.
``$HF_DATASETS_CACHE`` or ``~/.cache/huggingface/datasets``). An entry is a directory named by the fingerprint,
built under a temporary name and renamed when complete, so a killed run never leaves an entry that looks finished.
Entries are never deleted by tunesmith; remove the directory to reclaim the space.

:func:`tokenize_examples` does the same tokenization for a list of examples already in memory (small sets, tests).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tunesmith.data.formats import Example, Turn
from tunesmith.data.templates import Template
from tunesmith.data.source import cache_root
from tunesmith.data.tokenize import IGNORE, adds_bos, encode_batch
from tunesmith.errors import UserError

CACHE_VERSION = 2  # bump when the tokenized layout or the masking rules change
BATCH = 1000  # examples per Arrow record batch and per tokenizer call


@dataclass
class DataSummary:
    source: str
    examples: int = 0
    kept: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    eos_trained: int = 0
    doubled_bos: int = 0
    dropped: list[str] = field(default_factory=list)  # locations of examples with nothing left to train

    @property
    def trained_fraction(self) -> float:
        return self.trained_tokens / self.tokens if self.tokens else 0.0

    def lines(self) -> list[str]:
        dropped = f"{len(self.dropped)}" + (f" (first: {', '.join(self.dropped[:3])})" if self.dropped else "")
        return [
            f"data {self.source}: {self.examples} examples, {self.kept} kept, {dropped} dropped with no trainable "
            "token",
            f"  tokens {self.tokens}, trained {self.trained_tokens} ({100 * self.trained_fraction:.1f}%), "
            f"truncated {self.truncated}, EOS trained in {self.eos_trained}/{self.kept}, doubled BOS in "
            f"{self.doubled_bos}",
        ]


def _stats(tokenizer, encoded: list[dict | None], max_length: int) -> dict[str, list]:
    """Per-example summary columns of :func:`encode_batch`'s output (a dropped example has 0 trained tokens)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    cols = {"length": [], "trained": [], "truncated": [], "eos_trained": [], "doubled_bos": []}
    for enc in encoded:
        if enc is None:
            for key in cols:
                cols[key].append(0)
            continue
        ids, labels = enc["input_ids"], enc["labels"]
        trained = [x for x in labels if x != IGNORE]
        cols["length"].append(len(ids))
        cols["trained"].append(len(trained))
        cols["truncated"].append(int(enc["full_length"] > max_length))
        cols["eos_trained"].append(int(eos is not None and eos in trained))
        cols["doubled_bos"].append(int(bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos))
    return cols


def _summarize(source: str, stats: dict, locs, max_length: int) -> DataSummary:
    trained = np.asarray(stats["trained"])
    summary = DataSummary(source=source, examples=len(trained), kept=int((trained > 0).sum()),
                          tokens=int(np.sum(stats["length"])), trained_tokens=int(trained.sum()),
                          truncated=int(np.sum(stats["truncated"])), eos_trained=int(np.sum(stats["eos_trained"])),
                          doubled_bos=int(np.sum(stats["doubled_bos"])),
                          dropped=[locs[i] for i in np.flatnonzero(trained == 0)])
    if not summary.kept:
        raise UserError(f"{source}: no example has a trainable token left (all {summary.examples} are empty or "
                        f"truncated away at max_length={max_length})")
    return summary


def tokenize_examples(examples: list[Example], tokenizer, template: Template, max_length: int,
                      train_on_prompt: bool = False, source: str = "") -> tuple[list[dict], DataSummary]:
    """Tokenize examples held in memory: the kept ones as ``{input_ids, labels}`` dicts, and the summary."""
    encoded = encode_batch(tokenizer, template, examples, max_length, train_on_prompt)
    summary = _summarize(source, _stats(tokenizer, encoded, max_length), [ex.loc for ex in examples], max_length)
    return [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in encoded if e is not None], summary


# --- the Arrow path -------------------------------------------------------------------------------------------------

def _example_schema():
    import pyarrow as pa

    turn = pa.struct([("prompt", pa.string()), ("response", pa.string())])
    return pa.schema([("turns", pa.list_(turn)), ("system", pa.string()), ("input", pa.string()),
                      ("text", pa.string()), ("loc", pa.string())])


def _example_row(ex: Example) -> dict:
    return {"turns": [{"prompt": t.prompt, "response": t.response} for t in ex.turns], "system": ex.system,
            "input": ex.input, "text": ex.text, "loc": ex.loc}


def row_examples(batch: dict) -> list[Example]:
    """A batch of the normalised-examples Arrow table (what a :func:`cached_map` function gets) as Examples."""
    return [Example(turns=[Turn(t["prompt"], t["response"]) for t in turns], system=system, input=inp, text=text,
                    loc=loc)
            for turns, system, inp, text, loc in zip(batch["turns"], batch["system"], batch["input"], batch["text"],
                                                      batch["loc"])]


def _write_examples(source, path: Path, require_response: bool = True, normalise=None) -> list[str]:
    """Stream the records of ``source`` into an Arrow file of normalised examples (or of ``normalise``'s rows);
    returns the columns written."""
    import pyarrow as pa

    if normalise is None:
        schema = _example_schema()
        rows_of = (_example_row(example) for example in source.examples(require_response))
    else:
        to_row, schema = normalise
        rows_of = (to_row(record) for record in source.records())
    rows = []
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for row in rows_of:
            rows.append(row)
            if len(rows) == BATCH:
                writer.write_batch(pa.RecordBatch.from_pylist(rows, schema=schema))
                rows = []
        if rows:
            writer.write_batch(pa.RecordBatch.from_pylist(rows, schema=schema))
    return schema.names


def _tokenize_rows(batch: dict, tokenizer, template: Template, max_length: int, train_on_prompt: bool) -> dict:
    """``Dataset.map`` function: a batch of normalised examples -> token columns + per-example summary columns."""
    encoded = encode_batch(tokenizer, template, row_examples(batch), max_length, train_on_prompt)
    return {"input_ids": [e["input_ids"] if e else [] for e in encoded],
            "labels": [e["labels"] if e else [] for e in encoded],
            **_stats(tokenizer, encoded, max_length)}


def _token_features():
    from datasets import Features, List, Value

    return Features({"loc": Value("string"), "input_ids": List(Value("int32")), "labels": List(Value("int32")),
                     "length": Value("int32"), "trained": Value("int32"), "truncated": Value("int8"),
                     "eos_trained": Value("int8"), "doubled_bos": Value("int8")})


class TokenizedData(Sequence):
    """Tokenized examples on memory-mapped Arrow files, read as a list of ``{input_ids, labels}`` dicts.

    ``len``, iteration and indexing by position (an int gives a dict; a slice, list or array gives a list of dicts).
    Only the examples kept (with a trained token) are visible. ``lengths`` holds every example's token count.
    """

    def __init__(self, dataset, kept: np.ndarray | None = None):
        self.dataset = dataset  # a datasets.Dataset with the columns of _token_features()
        self.kept = kept  # positions of the kept rows, or None when every row is kept
        self._tokens = dataset.select_columns(["input_ids", "labels"])
        lengths = dataset.data.column("length").to_numpy()
        self.lengths = lengths if kept is None else lengths[kept]

    def __len__(self) -> int:
        return len(self.lengths)

    def _rows(self, positions):
        return positions if self.kept is None else self.kept[positions]

    def __getitem__(self, i):
        if isinstance(i, (int, np.integer)):
            if not -len(self) <= i < len(self):
                raise IndexError(f"index {i} out of range for {len(self)} examples")
            return self._tokens[int(self._rows(i % len(self)))]
        positions = np.arange(len(self))[i] if isinstance(i, slice) else np.asarray(i, dtype=np.int64)
        if not len(positions):
            return []
        cols = self._tokens[self._rows(positions).tolist()]
        return [{"input_ids": a, "labels": b} for a, b in zip(cols["input_ids"], cols["labels"])]

    def __iter__(self):
        for start in range(0, len(self), BATCH):
            yield from self[start:start + BATCH]


def _fingerprint(source, key: dict, tokenizer, require_response: bool) -> str:
    h = hashlib.sha256()
    h.update(source.fingerprint.encode())  # the data itself: a file's bytes, a hub split's fingerprint
    settings = {"version": CACHE_VERSION, "source": source.display, "split": source.split,
                "format": source.format_option, "require_response": require_response, **key}
    if tokenizer is not None:
        from datasets.fingerprint import Hasher

        backend = getattr(tokenizer, "backend_tokenizer", None)
        h.update((backend.to_str() if backend is not None else Hasher.hash(tokenizer)).encode())
        settings.update(tokenizer=type(tokenizer).__name__, special_tokens=tokenizer.special_tokens_map,
                        bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, adds_bos=adds_bos(tokenizer),
                        chat_template=getattr(tokenizer, "chat_template", None))
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


@contextlib.contextmanager
def _node_main_process_first():
    """Under torch.distributed, the node's main process (LOCAL_RANK 0) runs the block first; the others wait at a
    barrier, then run it (and find its result in the cache). If the main process fails, the others are released and
    fail on their own. The wait is bounded by the process group's timeout (the Trainer's ``ddp_timeout``)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        yield
        return
    # accelerate's PartialState cannot be used here: under plain torchrun on CPU it reports one process
    main = int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0
    if not main:
        dist.barrier()
    try:
        yield
    finally:
        if main:
            dist.barrier()


def _load_entry(entry: Path):
    from datasets import Dataset, concatenate_datasets

    manifest = json.loads((entry / "manifest.json").read_text(encoding="utf-8"))
    parts = [Dataset.from_file(str(entry / name)) for name in manifest["files"]]
    return (parts[0] if len(parts) == 1 else concatenate_datasets(parts)), manifest


def _build_entry(source, root: Path, entry: Path, function, fn_kwargs: dict, features, require_response: bool,
                 num_proc: int | None, desc: str | None, finish, normalise=None) -> None:
    from datasets import Dataset

    root.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(dir=root, prefix=f".{entry.name}.building-"))
    try:
        columns = _write_examples(source, build / "examples.arrow", require_response, normalise)
        examples = Dataset.from_file(str(build / "examples.arrow"))
        n = len(examples)
        mapped = examples.map(
            function, batched=True, batch_size=BATCH, num_proc=num_proc if num_proc and num_proc > 1 else None,
            fn_kwargs=fn_kwargs, remove_columns=[c for c in columns if c != "loc"], features=features,
            cache_file_name=str(build / "data.arrow"), load_from_cache_file=False, new_fingerprint=entry.name,
            desc=desc or f"preparing {source.display}")
        del examples
        (build / "examples.arrow").unlink()
        manifest = {"examples": n, **(finish(mapped, build) if finish else {})}
        manifest["files"] = [Path(f["filename"]).name for f in mapped.cache_files]
        del mapped
        (build / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
        try:
            os.rename(build, entry)  # atomic: the entry appears complete or not at all
        except OSError:
            if not (entry / "manifest.json").exists():  # not a concurrent build that won the race
                raise
    finally:
        shutil.rmtree(build, ignore_errors=True)


def cached_map(source, function, *, key: dict, features, tokenizer=None, fn_kwargs: dict | None = None,
               require_response: bool = True, num_proc: int | None = None,
               cache_dir: str | os.PathLike | None = None, desc: str | None = None, finish=None, normalise=None):
    """``function`` mapped over the normalised examples of ``source`` (a :class:`~tunesmith.data.source.DataSource`),
    built once and cached; returns ``(datasets.Dataset, manifest)``.

    ``function(batch, **fn_kwargs)`` gets a batch of the examples table (columns turns, system, input, text, loc:
    :func:`row_examples` turns it into Examples) and returns the output columns; ``features`` types them and must
    include ``loc`` (kept from the input). ``key``: every setting that changes the output (JSON-able); the data's
    bytes, the source's path / split / format, ``require_response`` and the tokenizer (when given) are added.
    ``finish(dataset, build_dir)``: run once on the fresh output; it may write files into ``build_dir`` and returns
    a JSON-able dict stored in the manifest (raise UserError there to refuse the data: nothing is cached).
    ``normalise``: ``(to_row, pyarrow_schema)`` to stream ``to_row(record) -> dict`` rows (with a ``loc`` column)
    instead of normalised examples, for records that are not examples (preference pairs); ``function`` then gets
    batches of those columns, and every column but ``loc`` is dropped from the output unless it returns it.
    """
    if normalise is not None:
        key = {**key, "normalise": getattr(normalise[0], "__qualname__", repr(normalise[0])),
               "normalise_schema": str(normalise[1])}
    root = cache_root(cache_dir)
    with _node_main_process_first():
        entry = root / _fingerprint(source, key, tokenizer, require_response)
        if not (entry / "manifest.json").exists():
            _build_entry(source, root, entry, function, fn_kwargs or {}, features, require_response, num_proc, desc,
                         finish, normalise)
        dataset, manifest = _load_entry(entry)
    manifest["entry"] = str(entry)
    return dataset, manifest


def tokenize_source(source, tokenizer, template: Template, max_length: int, *, train_on_prompt: bool = False,
                    num_proc: int | None = None, cache_dir: str | os.PathLike | None = None
                    ) -> tuple[TokenizedData, DataSummary]:
    """Tokenized, masked examples of ``source`` (memory-mapped, cached) and their summary; raises UserError naming
    the file, line and field of the first bad record. ``num_proc``: processes that tokenize (``dataset_num_proc``)."""

    def finish(tokens, build: Path) -> dict:
        import pyarrow.compute as pc

        table = tokens.data
        stats = {k: table.column(k).to_numpy() for k in ("length", "trained", "truncated", "eos_trained",
                                                         "doubled_bos")}
        dropped = np.flatnonzero(stats["trained"] == 0)
        locs = dict(zip(dropped.tolist(), pc.take(table.column("loc"), dropped).to_pylist()))
        summary = _summarize(source.display, stats, locs, max_length)
        if len(dropped):
            np.save(build / "kept.npy", np.flatnonzero(stats["trained"] > 0))
        return {"summary": asdict(summary)}

    key = {"stage": "tokens", "template": template.spec(), "max_length": max_length,
           "train_on_prompt": train_on_prompt}
    dataset, manifest = cached_map(
        source, _tokenize_rows, key=key, features=_token_features(), tokenizer=tokenizer,
        fn_kwargs={"tokenizer": tokenizer, "template": template, "max_length": max_length,
                   "train_on_prompt": train_on_prompt},
        num_proc=num_proc, cache_dir=cache_dir, desc=f"tokenizing {source.display}", finish=finish)
    entry = Path(manifest["entry"])
    kept = np.load(entry / "kept.npy") if (entry / "kept.npy").exists() else None
    return TokenizedData(dataset, kept), DataSummary(**{**manifest["summary"], "source": source.display})
