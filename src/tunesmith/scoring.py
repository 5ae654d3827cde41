"""Scoring tokens under a model: the training loss, per-token and per-sequence log-probs, token-weighted dataset loss.

Lean logits: a batch x sequence x vocabulary float32 tensor is never built. The model runs with ``logits_to_keep=1``
(its head projects one position per row), its decoder's final hidden states are taken by a forward hook (not
``output_hidden_states``, which keeps every layer's states), and the head is applied
here only to the positions that have a label, a chunk of tokens at a time (:data:`CHUNK_LOGITS` logits at most).
With gradients, each chunk is checkpointed: its logits are dropped after the forward and recomputed in the backward,
so one chunk's logits exist at a time in both directions. The one projected position checks that the head is a
plain projection of the final hidden state; when it is not (logit soft-capping or scaling), or when the head's
weights are sharded outside the forward (FSDP, DeepSpeed ZeRO-3), the model's own full logits are used instead.
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunesmith.data.tokenize import IGNORE
from tunesmith.models import unwrap_distributed

CHUNK_LOGITS = 2 ** 25  # logits materialised at once: 128 MiB in float32 (220 tokens at a 152k vocabulary)

_FULL_LOGITS: "weakref.WeakSet" = weakref.WeakSet()  # models scored with their own logits (head not plain, or sharded)


def model_inputs(batch: dict) -> dict:
    """The keys a causal LM forward takes (drops labels and tunesmith's token_mask). No KV cache: transformers only
    isolates packed examples (block-diagonal mask from position_ids) when no cache is in use."""
    keep = ("input_ids", "attention_mask", "position_ids", "inputs_embeds")
    return {**{k: v for k, v in batch.items() if k in keep}, "use_cache": False}


def needs_one_row(model, batch: dict) -> bool:
    """Whether ``batch`` holds packed rows (position ids, no attention mask) that must reach the model as ONE row.

    Under FlashAttention transformers finds the examples of a packed batch from its position ids only when the batch
    has a single row (``_is_packed_sequence`` in ``modeling_flash_attention_utils``); with more rows it runs plain
    causal attention over each whole row, and packed examples attend to each other. Joined into one row, every row
    starts a new segment (its position ids restart at 0, as do those of its padding tail), so the variable-length
    kernel gets each example as a sequence of its own. sdpa, eager and flex attention build a block-diagonal mask
    from the position ids of every row and need nothing."""
    from transformers.utils.generic import is_flash_attention_requested

    ids = batch.get("input_ids")
    if ids is None or ids.dim() != 2 or ids.shape[0] < 2:
        return False
    if "position_ids" not in batch or batch.get("attention_mask") is not None:
        return False
    config = getattr(unwrap_distributed(model), "config", None)
    return config is not None and is_flash_attention_requested(config)


def one_row(batch: dict) -> dict:
    """``batch`` with every (batch, seq[, ...]) tensor joined into one row of batch x seq positions (a view, no copy).
    The label of each row's first token is -100 (packing), so no row is trained to follow the one before."""
    b, w = batch["input_ids"].shape[:2]
    return {k: v.reshape(1, b * w, *v.shape[2:]) if torch.is_tensor(v) and v.shape[:2] == (b, w) else v
            for k, v in batch.items()}


def _sharded(model) -> bool:
    """True when parameters live sharded outside the forward (FSDP, DeepSpeed ZeRO-3): the head cannot be applied
    after the forward returns."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # older torch
        FSDPModule = FullyShardedDataParallel
    if any(isinstance(m, (FullyShardedDataParallel, FSDPModule)) for m in model.modules()):
        return True
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _final_hidden(model, batch: dict):
    """(final hidden states, head, vocabulary size) from a forward that projects one position per row, or None when
    the head must not be applied outside the model (see the module docstring)."""
    base = unwrap_distributed(model)
    if base in _FULL_LOGITS:
        return None
    head = base.get_output_embeddings()
    if head is None or _sharded(model):
        _FULL_LOGITS.add(base)
        return None
    out, hidden = _forward_keeping_final_hidden(model, base, batch)
    with torch.no_grad():
        plain = torch.allclose(head(hidden[:, -1:]).float(), out.logits.float(), rtol=1e-3, atol=1e-4)
    if not plain:
        _FULL_LOGITS.add(base)
        return None
    return hidden, head, out.logits.shape[-1]


def _forward_keeping_final_hidden(model, base, batch: dict):
    """The forward with ``logits_to_keep=1`` and the decoder's final hidden states, taken from the decoder's output
    by a hook: ``output_hidden_states`` would also keep every layer's states alive (without gradients, that is one
    batch x sequence x width tensor per layer held until the forward ends)."""
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is None or decoder is base:
        out = model(**model_inputs(batch), output_hidden_states=True, logits_to_keep=1)
        return out, out.hidden_states[-1]
    seen = []
    hook = decoder.register_forward_hook(
        lambda _m, _a, o: seen.append(o[0] if isinstance(o, tuple) else o.last_hidden_state))
    try:
        out = model(**model_inputs(batch), logits_to_keep=1)
    finally:
        hook.remove()
    return out, seen[-1]


def _chunk_logprobs(head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(head(hidden).float(), labels, reduction="none")


def label_logprobs(hidden: torch.Tensor, head, labels: torch.Tensor, vocab_size: int,
                   greedy: bool = False):
    """log p(label) under ``head`` for every position of ``labels`` (aligned with ``hidden``: the label of position t
    is the token it predicts) that is not -100, in row-major order: shape (labelled tokens,). Projects
    ``CHUNK_LOGITS // vocab_size`` tokens at a time, checkpointed when gradients are on. ``greedy`` (no gradients)
    also returns whether each label is the most likely token."""
    mask = labels != IGNORE
    h, y = hidden[mask], labels[mask]
    step = max(1, CHUNK_LOGITS // vocab_size)
    parts, argmax_hits = [], []
    for s in range(0, len(y), step):
        hs, ys = h[s:s + step], y[s:s + step]
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_logprobs, head, hs, ys, use_reentrant=False))
        elif greedy:
            logits = head(hs).float()
            parts.append(-F.cross_entropy(logits, ys, reduction="none"))
            argmax_hits.append(logits.argmax(-1) == ys)
        else:
            parts.append(_chunk_logprobs(head, hs, ys))
    values = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
    if greedy:
        return values, torch.cat(argmax_hits) if argmax_hits else torch.zeros(0, dtype=torch.bool, device=h.device)
    return values


def target_logprobs(model, batch: dict, targets: torch.Tensor, greedy: bool = False):
    """log p(``targets[b, t]`` | the row's tokens up to t) wherever the target is not -100, 0 elsewhere: shape
    (batch, seq), like ``batch["input_ids"]``. ``greedy`` (no gradients) also returns a bool tensor of that shape:
    whether the target is the model's most likely next token there (lm-eval's exact match)."""
    if needs_one_row(model, batch):  # FlashAttention: the rows go in as one, the results come back per row
        b, w = targets.shape
        out = target_logprobs(model, one_row(batch), targets.reshape(1, b * w), greedy)
        return tuple(x.reshape(b, w) for x in out) if greedy else out.reshape(b, w)
    mask = targets != IGNORE
    lean = _final_hidden(model, batch)
    if lean is None:  # the model's own logits
        logits = model(**model_inputs(batch)).logits.float()
        logp = -F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none") * mask
        return (logp, (logits.argmax(-1) == targets) & mask) if greedy else logp
    hidden, head, vocab = lean
    out = label_logprobs(hidden, head, targets, vocab, greedy)
    values, hits = out if greedy else (out, None)
    logp = torch.zeros(mask.shape, dtype=values.dtype, device=values.device).index_put((mask,), values)
    if greedy:
        return logp, torch.zeros_like(mask).index_put((mask,), hits)
    return logp


def token_logprobs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each label token, mask of trained tokens), both (batch, seq-1), aligned with shifted labels."""
    labels = batch["labels"][:, 1:]
    logp = target_logprobs(model, batch, F.pad(labels, (0, 1), value=IGNORE))
    return logp[:, :-1], labels != IGNORE


def sequence_logprobs(model, batch: dict) -> torch.Tensor:
    """Sum of log-probabilities of the trained (response) tokens of each row: shape (batch,)."""
    logp, _ = token_logprobs(model, batch)
    return logp.sum(dim=1)


def causal_lm_loss(model, batch: dict, num_items_in_batch=None) -> torch.Tensor:
    """The causal-LM loss the model itself computes from ``labels`` — the sum of -log p over label tokens divided by
    ``num_items_in_batch`` (the trained tokens of the whole accumulated batch), or the mean over this batch's label
    tokens when it is None — with lean logits."""
    if needs_one_row(model, batch):  # FlashAttention: the same tokens and labels as one row (see needs_one_row)
        batch = one_row(batch)
    labels = batch["labels"][:, 1:]
    lean = _final_hidden(model, batch)
    if lean is None:
        return model(**model_inputs(batch), labels=batch["labels"], num_items_in_batch=num_items_in_batch).loss
    hidden, head, vocab = lean
    nll = -label_logprobs(hidden[:, :-1], head, labels, vocab).sum()
    if num_items_in_batch is None:
        return nll / (labels != IGNORE).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(nll.device)
    return nll / num_items_in_batch


@torch.no_grad()
def dataset_loss(model, batches, device=None, desc: str | None = None) -> dict:
    """Token-weighted mean NLL over all trained tokens of ``batches`` (an iterable of collated batches), noise-free.

    Under torch.distributed each rank passes its own shard; sums are all-reduced so every rank gets the total.
    ``desc``: show a progress bar with this label (None: none).
    """
    from tunesmith.progress import bar

    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in bar(batches, desc, total=len(batches) if hasattr(batches, "__len__") else None):
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        logp, mask = token_logprobs(model, batch)
        total += torch.stack([-logp.sum().double(), mask.sum().double()]).to(total.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    model.train(was_training)
    nll, n = total.tolist()
    loss = nll / n if n else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(n)}


def rows_loss(model, rows, collate, batch_size: int, device=None, rank: int = 0, world_size: int = 1,
              desc: str | None = None) -> dict:
    """:func:`dataset_loss` of tokenized ``rows`` (a list or a ``datasets.Dataset``), batched by ``collate``.

    Under torch.distributed every rank passes all rows and scores its share (rows rank, rank + world_size, ...); the
    sums are all-reduced, so every rank returns the loss of the whole set. Rows are batched in order of length (the
    token-weighted sum does not depend on the order, and batches of like lengths carry little padding).
    ``desc``: show a progress bar with this label.
    """
    shard = sorted((rows[i] for i in range(rank, len(rows), world_size)), key=lambda r: len(r["input_ids"]))
    batches = torch.utils.data.DataLoader(shard, batch_size=batch_size, collate_fn=collate)
    return dataset_loss(model, batches, device=device, desc=desc)
