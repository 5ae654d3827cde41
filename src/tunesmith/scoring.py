"""Scoring tokens under a model, noise-free: per-sequence log-prob sums (SPIN) and token-weighted dataset loss."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tunesmith.data.tokenize import IGNORE
from tunesmith.models import unwrap_distributed


def model_inputs(batch: dict) -> dict:
    """The keys a causal LM forward takes (drops labels and tunesmith's token_mask). No KV cache: transformers only
    isolates packed examples (block-diagonal mask from position_ids) when no cache is in use."""
    keep = ("input_ids", "attention_mask", "position_ids", "inputs_embeds")
    return {**{k: v for k, v in batch.items() if k in keep}, "use_cache": False}


def token_logprobs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each label token, mask of trained tokens), both (batch, seq-1), aligned with shifted labels."""
    logits = model(**model_inputs(batch)).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    logp = -F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    return logp * mask, mask


def sequence_logprobs(model, batch: dict) -> torch.Tensor:
    """Sum of log-probabilities of the trained (response) tokens of each row: shape (batch,)."""
    logp, _ = token_logprobs(model, batch)
    return logp.sum(dim=1)


def answer_logprobs(model, batch: dict) -> torch.Tensor:
    """Summed log-probs of each row's answer tokens: ``sequence_logprobs`` with the LM head applied only to
    the positions that predict an answer token (prompt and padding positions are never projected onto the vocabulary,
    as in TRL's fused head). The model's own logits at one position check that its head is a plain projection of the
    final hidden state; when it is not (logit scaling, soft-capping), this falls back to ``sequence_logprobs``.
    """
    out = model(**model_inputs(batch), output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1]
    head = unwrap_distributed(model).get_output_embeddings()
    if head is None or not torch.allclose(head(hidden[:, -1:]).float(), out.logits.float(), rtol=1e-3, atol=1e-4):
        return sequence_logprobs(model, batch)
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    logits = head(hidden[:, :-1][mask]).float()  # (answer tokens, vocab)
    logp = -F.cross_entropy(logits, labels[mask], reduction="none")
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(labels)[mask]
    return torch.zeros(labels.shape[0], dtype=logp.dtype, device=logp.device).index_add(0, rows, logp)


@torch.no_grad()
def dataset_loss(model, batches, device=None) -> dict:
    """Token-weighted mean NLL over all trained tokens of ``batches`` (an iterable of collated batches), noise-free.

    Under torch.distributed each rank passes its own shard; sums are all-reduced so every rank gets the total.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
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


def rows_loss(model, rows, collate, batch_size: int, device=None, rank: int = 0, world_size: int = 1) -> dict:
    """:func:`dataset_loss` of tokenized ``rows`` (a list or a ``datasets.Dataset``), batched by ``collate``.

    Under torch.distributed every rank passes all rows and scores its share (rows rank, rank + world_size, ...); the
    sums are all-reduced, so every rank returns the loss of the whole set.
    """
    shard = [rows[i] for i in range(rank, len(rows), world_size)]
    batches = torch.utils.data.DataLoader(shard, batch_size=batch_size, collate_fn=collate)
    return dataset_loss(model, batches, device=device)
