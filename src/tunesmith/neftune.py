"""NEFTune (Jain et al. 2023), as the authors' own code does it — the one implementation every training path uses.

For every example i with L_i real tokens and embedding width d, during TRAINING forward passes only:

    e'_i = e_i + alpha / sqrt(L_i * d) * eps_i,   eps_i ~ Uniform(-1, 1)   (or N(0, 1): the paper's Table 6 ablation)

* L_i is the example's own count of real tokens (the attention mask's sum), never the padded batch length.
* Padding positions get exactly zero noise. Prompt and response tokens both get noise.
* In a packed row, every segment (an example; a new one starts where ``position_ids`` restarts at 0) gets the scale
  of its own length, so an example receives the same noise distribution packed or alone.

Mechanism (the same everywhere): the trainer computes the token embeddings itself with the model's input-embedding
module (after unwrapping PEFT / DDP), adds the noise and passes ``inputs_embeds`` to the forward. Nothing is hooked or
patched, so nothing can leak into evaluation, generation, a reference pass or a saved model: the noise exists only
where a training step asks for it.

This differs from transformers' built-in ``neftune_noise_alpha`` hook, which scales by the padded (or packed) length
of the whole batch and noises padding too (transformers issue 34659).
"""
from __future__ import annotations

from typing import Literal

import torch

Distribution = Literal["uniform", "gaussian"]


def noise_scale(token_mask: torch.Tensor, dim: int, alpha: float,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token scale alpha / sqrt(L * d), float32, zero where ``token_mask`` is 0. Shape (batch, seq).

    Without ``position_ids`` each row is one example (L = the row's mask sum). With ``position_ids`` (packed rows)
    each segment starting at a 0 gets its own L. Runs on the mask's device with no host synchronisation.
    """
    mask = token_mask.to(torch.float32)
    if position_ids is None:
        lengths = mask.sum(dim=1, keepdim=True).expand_as(mask)
    else:
        starts = (position_ids == 0).to(torch.int64)
        seg = torch.cumsum(starts, dim=1)  # segment index within the row, 1-based (0 only before a first start)
        row_offset = torch.arange(seg.shape[0], device=seg.device).unsqueeze(1) * (seg.shape[1] + 1)
        flat = (seg + row_offset).flatten()
        counts = torch.zeros(seg.numel() + seg.shape[0], dtype=torch.float32, device=seg.device)
        counts.index_add_(0, flat, mask.flatten())
        lengths = counts[flat].view_as(mask)
    return mask * (alpha / torch.sqrt(lengths.clamp(min=1.0) * dim))


def sample_noise(shape: torch.Size, scale: torch.Tensor, distribution: Distribution = "uniform",
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """eps * scale with eps ~ U(-1, 1) or N(0, 1); float32, shape (batch, seq, dim)."""
    if distribution == "uniform":
        eps = torch.rand(shape, dtype=torch.float32, device=scale.device, generator=generator) * 2 - 1
    elif distribution == "gaussian":
        eps = torch.randn(shape, dtype=torch.float32, device=scale.device, generator=generator)
    else:
        raise ValueError(f"neftune_noise_distribution must be 'uniform' or 'gaussian', got {distribution!r}")
    return eps * scale.unsqueeze(-1)


def input_embedding_module(model: torch.nn.Module) -> torch.nn.Module:
    """The token-embedding module, through DDP / FSDP / PEFT wrappers."""
    from tunesmith.models import unwrap_distributed

    return unwrap_distributed(model).get_input_embeddings()


def add_noise_to_batch(model: torch.nn.Module, batch: dict, alpha: float,
                       distribution: Distribution = "uniform", generator: torch.Generator | None = None) -> dict:
    """Return a copy of ``batch`` whose ``input_ids`` are replaced by noised ``inputs_embeds``.

    ``batch`` may carry ``attention_mask`` (padded rows) or ``position_ids`` plus ``token_mask`` (packed rows;
    ``token_mask`` marks real tokens and is consumed here). Call only for training forward passes.
    """
    batch = dict(batch)
    input_ids = batch.pop("input_ids")
    token_mask = batch.pop("token_mask", None)
    if token_mask is None:
        token_mask = batch.get("attention_mask")
    if token_mask is None:
        token_mask = torch.ones_like(input_ids)
    embeds = input_embedding_module(model)(input_ids)
    scale = noise_scale(token_mask, embeds.shape[-1], alpha, batch.get("position_ids"))
    noise = sample_noise(embeds.shape, scale, distribution, generator)
    batch["inputs_embeds"] = embeds + noise.to(embeds.dtype)
    return batch


def rank_seed_callback():
    """A TrainerCallback for NEFTune under DDP. The noise is drawn from torch's generator, which the Trainer seeds
    with the same ``seed`` on every rank, so every rank would draw the same noise for batches of the same shape. When
    training begins, rank r > 0 reseeds it with ``seed + r`` (rank 0 keeps its stream: a single process is
    unchanged). Runs stay reproducible, and a resumed run continues each rank's stream: the Trainer saves every rank's
    generator state in checkpoints and restores it after this callback has run."""
    from transformers import TrainerCallback

    class RankNoiseSeed(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if args.process_index > 0:
                torch.manual_seed(args.seed + args.process_index)  # CPU and every CUDA device

    return RankNoiseSeed()


class NEFTuneTrainerMixin:
    """For ``transformers.Trainer`` subclasses: ``training_inputs`` noises a batch on training passes only, and
    transformers' own hook (padded length, noised padding) is kept off. Takes ``neftune_alpha`` (None or 0 = off) and
    ``neftune_distribution`` keyword arguments. Under DDP each rank draws its own noise (:func:`rank_seed_callback`)."""

    def __init__(self, *args, neftune_alpha: float | None = None, neftune_distribution: Distribution = "uniform",
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.neftune_noise_alpha = None  # Trainer.train attaches its built-in hook when this is set
        self.noise_alpha = neftune_alpha or 0.0
        self.noise_distribution = neftune_distribution
        if self.noise_alpha:
            self.add_callback(rank_seed_callback())

    def training_inputs(self, model: torch.nn.Module, inputs: dict) -> dict:
        if self.noise_alpha and model.training:
            return add_noise_to_batch(model, inputs, self.noise_alpha, self.noise_distribution)
        return inputs
