"""Dataset mixtures: which rows of which source a run takes, and in what order.

Per source, ``num_samples`` takes that many of its examples: fewer than it has is a seeded random subset (without
replacement, in file order); more repeats the whole source as often as it fits and adds a seeded random subset for
the rest (LLaMA-Factory's ``num_samples`` up- and down-sampling). Then:

* ``concat`` puts the sources one after the other (every example of every source once);
* ``interleave`` draws the source of each next example at random with probabilities proportional to the sources'
  ``weight`` (default 1 each) and stops when a source runs out, as ``datasets.interleave_datasets`` does by default
  (``first_exhausted``): the mixture holds the weights' proportions and no example twice. ``num_samples`` on a
  small source upsamples it first.

Everything is drawn from ``numpy.random.default_rng`` seeded by ``seed`` (a source's subset by ``(seed, its
position)``), so a run is reproducible and adding a source leaves the others' subsets alone.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tunesmith.errors import UserError


def _take(n: int, num_samples: int | None, rng) -> np.ndarray:
    if num_samples is None:
        return np.arange(n, dtype=np.int64)
    whole, rest = divmod(num_samples, n)
    subset = np.sort(rng.choice(n, size=rest, replace=False)).astype(np.int64)
    return np.concatenate([np.arange(n, dtype=np.int64)] * whole + [subset])


def _interleave(sizes: list[int], probabilities: np.ndarray, rng) -> np.ndarray:
    """The source of each example, drawn until one source would need more examples than it has."""
    draws = rng.choice(len(sizes), size=sum(sizes), p=probabilities)
    stop = len(draws)
    for k, n in enumerate(sizes):
        hits = np.flatnonzero(draws == k)
        if len(hits) > n:
            stop = min(stop, int(hits[n]))
    return draws[:stop]


def plan(sizes: list[int], specs: list, mixture: str = "concat", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(source, row)`` arrays: position i of the mixture is row ``row[i]`` of source ``source[i]``. ``specs``
    carry each source's ``weight`` and ``num_samples``."""
    picks = [_take(n, s.num_samples, np.random.default_rng([seed, k])) for k, (n, s) in enumerate(zip(sizes, specs))]
    if mixture == "concat":
        src = np.concatenate([np.full(len(p), k, dtype=np.int64) for k, p in enumerate(picks)])
        return src, np.concatenate(picks)
    if mixture != "interleave":
        raise UserError(f"field 'mixture': must be concat or interleave, got {mixture!r}")
    weights = np.array([s.weight if s.weight is not None else 1.0 for s in specs], dtype=np.float64)
    src = _interleave([len(p) for p in picks], weights / weights.sum(), np.random.default_rng(seed))
    row = np.empty(len(src), dtype=np.int64)
    for k, p in enumerate(picks):
        at = np.flatnonzero(src == k)
        row[at] = p[:len(at)]
    return src, row


class MixedRows(Sequence):
    """Rows taken from several sources' token rows (``TokenizedData`` or lists) by a :func:`plan`; read like a list
    of ``{input_ids, labels}`` dicts (an int gives a dict; a slice, list or array a list of dicts, with one read per
    source). ``lengths`` holds every row's token count."""

    def __init__(self, parts: list, src: np.ndarray, row: np.ndarray):
        self.parts, self.src, self.row = parts, src, row
        self.lengths = np.zeros(len(src), dtype=np.int64)
        for k, part in enumerate(parts):
            at = src == k
            lengths = getattr(part, "lengths", None)
            if lengths is None:
                lengths = np.array([len(r["input_ids"]) for r in part], dtype=np.int64)
            self.lengths[at] = np.asarray(lengths)[row[at]]

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i):
        if isinstance(i, (int, np.integer)):
            if not -len(self) <= i < len(self):
                raise IndexError(f"index {i} out of range for {len(self)} examples")
            i = int(i) % len(self)
            return self.parts[int(self.src[i])][int(self.row[i])]
        positions = np.arange(len(self))[i] if isinstance(i, slice) else np.asarray(i, dtype=np.int64)
        out: list = [None] * len(positions)
        src, row = self.src[positions], self.row[positions]
        for k in np.unique(src).tolist():
            at = np.flatnonzero(src == k)
            part = self.parts[k]
            got = part[row[at]] if not isinstance(part, list) else [part[j] for j in row[at].tolist()]
            for j, value in zip(at.tolist(), got):
                out[j] = value
        return out

    def __iter__(self):
        for start in range(0, len(self), 1000):
            yield from self[start:start + 1000]


@dataclass
class MixtureSummary:
    """Per-source data summaries and what the mixture took of each."""

    parts: list  # DataSummary per source
    names: list[str]
    src: np.ndarray  # the plan's source of each row
    mixture: str = "concat"
    seed: int = 0

    @property
    def counts(self) -> list[int]:
        return np.bincount(self.src, minlength=len(self.parts)).tolist()

    @property
    def kept(self) -> int:
        """Rows in the mixture."""
        return len(self.src)

    @property
    def dropped(self) -> list[str]:
        return [loc for p in self.parts for loc in p.dropped]

    @property
    def truncated(self) -> int:
        return sum(p.truncated for p in self.parts)

    def lines(self) -> list[str]:
        lines = [line for p in self.parts for line in p.lines()]
        whole = [p.kept for p in self.parts]
        if len(self.parts) > 1 or self.counts != whole:
            total = max(self.kept, 1)
            each = ", ".join(f"{n} {c} ({100 * c / total:.1f}%)" for n, c in zip(self.names, self.counts))
            lines.append(f"mixture ({self.mixture}, seed {self.seed}): {self.kept} examples: {each}")
        return lines
