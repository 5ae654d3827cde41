"""Batching: dynamic padding, or packing several examples per row with no attention or position leakage.

Packed rows carry ``position_ids`` that restart at 0 for every example and no ``attention_mask``; transformers then
builds a block-diagonal causal mask from the position ids, so no token attends across examples. The label of each
example's first token is -100, so no example is trained to follow the previous one. The batch also carries
``token_mask`` (1 on real tokens), which NEFTune uses to keep padding noise-free; the trainer drops it before the
model's forward.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from tunesmith.data.tokenize import IGNORE


def first_fit_decreasing(lengths, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """First-fit-decreasing bin packing in O(n log n): items longest first (ties in index order), each into the
    lowest-numbered bin with room for it, found by descending a segment tree of the bins' free space.

    Returns ``(members, offsets)``: bin ``b`` holds items ``members[offsets[b]:offsets[b + 1]]``, in index order.
    An item longer than ``capacity`` gets a bin of its own.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    order = np.argsort(-lengths, kind="stable")
    # Any-fit packing leaves at most one bin half empty or worse, so this many bins always suffice.
    bound = min(n, 2 * int(lengths.clip(max=capacity).sum()) // max(capacity, 1) + 2)
    size = 1
    while size < max(bound, 1):
        size *= 2
    tree = [capacity] * (2 * size)  # tree[i] = most free space in a bin under node i; leaves are bins, all empty
    bin_of = np.empty(n, dtype=np.int64)
    opened = 0
    for item, need in zip(order.tolist(), lengths[order].tolist()):
        if need > capacity:  # too long for any bin: alone, in the next unopened bin, which is then full
            node = size + opened
        else:
            node = 1
            while node < size:
                node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        b = node - size
        opened = max(opened, b + 1)
        bin_of[item] = b
        tree[node] = max(tree[node] - need, 0)
        node //= 2
        while node:
            best = max(tree[2 * node], tree[2 * node + 1])
            if tree[node] == best:
                break
            tree[node] = best
            node //= 2
    members = np.lexsort((np.arange(n), bin_of))  # by bin, then by index
    offsets = np.searchsorted(bin_of[members], np.arange(opened + 1))
    return members, offsets


class PackedRows(Sequence):
    """Rows of packed examples, concatenated (:func:`concat`) when read, so a million examples need no million lists.

    ``len`` and indexing by row (an int gives a dict; a slice gives a list of dicts), iteration. ``fill`` is the
    fraction of the rows' ``max_length`` token slots that hold a token.
    """

    def __init__(self, examples, members: np.ndarray, offsets: np.ndarray, fill: float):
        self.examples, self.members, self.offsets, self.fill = examples, members, offsets, fill

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, r):
        if isinstance(r, slice):
            return [self[i] for i in range(*r.indices(len(self)))]
        if not -len(self) <= r < len(self):
            raise IndexError(f"row {r} out of range for {len(self)} rows")
        r %= len(self)
        idx = self.members[self.offsets[r]:self.offsets[r + 1]]
        if isinstance(self.examples, list):
            return concat([self.examples[i] for i in idx.tolist()])
        return concat(self.examples[idx])  # TokenizedData: one read for the whole row

    def __iter__(self):
        for r in range(len(self)):
            yield self[r]

    def __add__(self, other) -> list[dict]:
        return list(self) + list(other)


def pack(examples, max_length: int) -> PackedRows:
    """First-fit-decreasing packing of tokenized examples (a list of dicts or a ``TokenizedData``) into rows of at
    most ``max_length`` tokens; rows are concatenated lazily, when read."""
    lengths = getattr(examples, "lengths", None)
    if lengths is None:
        lengths = [len(ex["input_ids"]) for ex in examples]
    members, offsets = first_fit_decreasing(lengths, max_length)
    fill = float(np.sum(lengths)) / (max_length * (len(offsets) - 1)) if len(offsets) > 1 else 0.0
    return PackedRows(examples, members, offsets, fill)


def concat(examples: list[dict]) -> dict:
    """One row holding ``examples`` back to back, with position ids restarting at each and no cross-example label."""
    ids, labels, pos = [], [], []
    for ex in examples:
        ids += ex["input_ids"]
        labels += [IGNORE] + ex["labels"][1:]
        pos += list(range(len(ex["input_ids"])))
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


class Collator:
    """Right-pads a list of examples (packed rows or single examples) into tensors.

    ``padding_free``: the batch's examples become ONE row, back to back (as packing does, but per batch, so every step
    sees exactly the examples random sampling drew): no padding is computed, and the loss and gradients equal those of
    the padded batch. Attention then spans the whole row under a block-diagonal mask, so it pays off for short
    examples or with a variable-length attention kernel (flash-attention).
    """

    def __init__(self, pad_token_id: int, padding_free: bool = False):
        self.pad_token_id = pad_token_id
        self.padding_free = padding_free

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if self.padding_free:
            features = [concat(features)]
        width = max(len(f["input_ids"]) for f in features)
        packed = "position_ids" in features[0]
        ids, labels, mask, pos = [], [], [], []
        for f in features:
            n = len(f["input_ids"])
            pad = width - n
            ids.append(f["input_ids"] + [self.pad_token_id] * pad)
            labels.append(f["labels"] + [IGNORE] * pad)
            mask.append([1] * n + [0] * pad)
            if packed:
                pos.append(f["position_ids"] + list(range(pad)))  # the padding tail is its own segment
        batch = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
        if packed:
            batch["position_ids"] = torch.tensor(pos)
            batch["token_mask"] = torch.tensor(mask)
        else:
            batch["attention_mask"] = torch.tensor(mask)
        return batch

