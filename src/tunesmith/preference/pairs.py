"""Pairs as batches and as log-probs: the collator, answer log-probs of both rows in one forward, and the reference
log-probs scored once, noise-free, and stored on disk in Arrow shards beside the pairs.

A pair is a mapping with ``prompt_ids``, ``chosen_ids`` and ``rejected_ids`` (token lists; the answers end as the
template ends an answer) and, once scored, ``ref_chosen`` / ``ref_rejected`` (the reference's summed answer
log-probs). Pairs live in memory-mapped Arrow tables (``datasets.Dataset``); nothing here holds a Python list of them.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from tunesmith.data.collate import Collator
from tunesmith.data.tokenize import IGNORE
from tunesmith.errors import UserError
from tunesmith.preference.loss import PairLogps
from tunesmith.scoring import token_logprobs

PAIR_KEYS = ("prompt_ids", "chosen_ids", "rejected_ids")
REF_KEYS = ("ref_chosen", "ref_rejected")


def answer_row(prompt_ids: list[int], answer_ids: list[int], max_length: int) -> dict:
    """Prompt + answer, cut at ``max_length`` from the end (the prompt's start is kept); labels on the answer only."""
    ids = (list(prompt_ids) + list(answer_ids))[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + list(answer_ids))[:max_length]
    return {"input_ids": ids, "labels": labels}


class PairCollator:
    """B pairs -> one batch of 2B answer rows, the B chosen then the B rejected: right-padded, or, with
    ``padding_free``, all back to back in ONE row (position ids restart per row, no padding computed; ``row_ids``
    tells which row each token belongs to). ``answer_tokens`` (2B,) counts each row's answer tokens after the cut;
    ``ref_chosen`` / ``ref_rejected`` come along when the pairs carry them."""

    def __init__(self, pad_token_id: int, max_length: int, padding_free: bool = False):
        self.rows = Collator(pad_token_id, padding_free)
        self.max_length, self.padding_free = max_length, padding_free

    def __call__(self, features: list[dict]) -> dict:
        rows = [answer_row(f["prompt_ids"], f["chosen_ids"], self.max_length) for f in features]
        rows += [answer_row(f["prompt_ids"], f["rejected_ids"], self.max_length) for f in features]
        batch = self.rows(rows)
        batch["answer_tokens"] = torch.tensor([sum(x != IGNORE for x in r["labels"]) for r in rows])
        if self.padding_free:
            batch["row_ids"] = torch.tensor([[i for i, r in enumerate(rows) for _ in r["input_ids"]]])
        if REF_KEYS[0] in features[0]:
            for key in REF_KEYS:
                batch[key] = torch.tensor([f[key] for f in features], dtype=torch.float64)
        return batch


def pair_logps(model, batch: dict) -> PairLogps:
    """Summed answer log-probs of every row of a :class:`PairCollator` batch, in one forward with lean logits (see
    :mod:`tunesmith.scoring`), split into the chosen and the rejected half."""
    logp, mask = token_logprobs(model, batch)
    counts = batch["answer_tokens"]
    if "row_ids" in batch:  # one padding-free row: add each token's log-prob to its answer row
        rows = batch["row_ids"][:, 1:]
        sums = logp.new_zeros(len(counts)).index_add(0, rows[mask], logp[mask])
    else:
        sums = logp.sum(dim=1)
    chosen, rejected = sums.chunk(2)
    n_chosen, n_rejected = counts.to(sums.device).chunk(2)
    return PairLogps(chosen, rejected, n_chosen, n_rejected)


@torch.no_grad()
def score_pairs(model, pairs, collator: PairCollator, batch_size: int, device) -> tuple[list[float], list[float]]:
    """Noise-free summed answer log-probs (chosen, rejected) of every pair of ``pairs`` (a Dataset or list), in
    order. The caller puts the model in eval mode."""
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        rows = pairs[start:start + batch_size]
        if isinstance(rows, dict):  # a Dataset slice: columns
            rows = [dict(zip(rows, values)) for values in zip(*rows.values())]
        batch = {k: v.to(device) for k, v in collator(rows).items() if not k.startswith("ref_")}
        logps = pair_logps(model, batch)
        chosen += logps.chosen.double().tolist()
        rejected += logps.rejected.double().tolist()
    return chosen, rejected


# ------------------------------------------------------------------------------------------------ shards on disk


def shard_path(directory: Path, k: int) -> Path:
    return Path(directory) / f"shard-{k:05d}.arrow"


def write_shard(path: Path, columns: dict) -> None:
    """Write one Arrow shard (IPC stream, the layout ``datasets`` memory-maps) atomically
    (:func:`tunesmith.io.atomic_path`)."""
    import pyarrow as pa

    from tunesmith.io import atomic_path

    table = pa.table(columns)
    with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as f, pa.ipc.new_stream(f, table.schema) as writer:
        writer.write_table(table)


def read_shards(directory: Path, n_shards: int):
    """Shards 0..n-1 of ``directory`` as one memory-mapped ``datasets.Dataset``."""
    from datasets import Dataset, concatenate_datasets

    parts = []
    for k in range(n_shards):
        path = shard_path(directory, k)
        if not path.exists():
            raise UserError(f"{path}: missing shard (the run directory was modified)")
        parts.append(Dataset.from_file(str(path)))
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def shard_seconds(directory: Path, n: int) -> float:
    """The seconds the ``n`` shards of ``directory`` took to write (each shard's ``seconds`` column holds its own)."""
    import pyarrow as pa

    total = 0.0
    for k in range(n):
        with pa.memory_map(str(shard_path(directory, k))) as source:
            batch = pa.ipc.open_stream(source).read_next_batch()
            total += float(batch.column("seconds")[0].as_py()) if batch.num_rows else 0.0
    return total


def n_shards(n: int, shard_size: int) -> int:
    return -(-n // shard_size)


def score_reference(model, pairs, directory: Path, collator: PairCollator, *, shard_size: int, batch_size: int,
                    device, rank: int = 0, world_size: int = 1, on_shard=None) -> None:
    """The reference's log-probs of every pair of ``pairs`` (a Dataset), noise-free, in Arrow shards of ``shard_size``
    pairs (``ref_chosen``, ``ref_rejected``, ``seconds``). Shards already on disk are kept (a killed run resumes); under
    torch.distributed rank r scores shards r, r + world, ... . ``on_shard(k)`` is called after each shard written."""
    from tunesmith.models import eval_mode

    with eval_mode(model):
        for k in range(rank, n_shards(len(pairs), shard_size), world_size):
            path = shard_path(directory, k)
            if path.exists():
                continue
            start = time.perf_counter()
            chunk = pairs.select(range(k * shard_size, min(len(pairs), (k + 1) * shard_size)))
            chosen, rejected = score_pairs(model, chunk, collator, batch_size, device)
            seconds = time.perf_counter() - start
            write_shard(path, {"ref_chosen": chosen, "ref_rejected": rejected, "seconds": [seconds] * len(chosen)})
            if on_shard:
                on_shard(k)


def with_reference(pairs, directory: Path, shard_size: int):
    """``pairs`` (a Dataset) with the reference columns of ``directory``'s shards beside them (zero-copy)."""
    from datasets import concatenate_datasets

    ref = read_shards(directory, n_shards(len(pairs), shard_size)).select_columns(list(REF_KEYS))
    if len(ref) != len(pairs):
        raise UserError(f"{directory}: {len(ref)} reference rows for {len(pairs)} pairs (the run directory was "
                        "modified)")
    return concatenate_datasets([pairs, ref], axis=1)
