"""Batching: dynamic padding, or packing several examples per row with no attention or position leakage.

Packed rows carry ``position_ids`` that restart at 0 for every example and no ``attention_mask``; transformers then
builds a block-diagonal causal mask from the position ids, so no token attends across examples. The label of each
example's first token is -100, so no example is trained to follow the previous one. The batch also carries
``token_mask`` (1 on real tokens), which NEFTune uses to keep padding noise-free; the trainer drops it before the
model's forward.
"""
from __future__ import annotations

import torch

from tunesmith.data.tokenize import IGNORE


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """First-fit-decreasing bin packing of tokenized examples into rows of at most ``max_length`` tokens."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    rows: list[list[int]] = []
    space: list[int] = []
    for i in order:
        n = len(examples[i]["input_ids"])
        for r, free in enumerate(space):
            if n <= free:
                rows[r].append(i)
                space[r] -= n
                break
        else:
            rows.append([i])
            space.append(max_length - n)
    return [concat([examples[i] for i in sorted(members)]) for members in rows]


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

