"""NEFTune (Jain et al. 2023), as the authors' own code does it — the one implementation every training path uses.

For every example i with L_i real tokens and embedding width d, during TRAINING forward passes only:

    e'_i = e_i + alpha / sqrt(L_i * d) * eps_i,   eps_i ~ Uniform(-1, 1)   (or N(0, 1): the paper's Table 6 ablation)

* L_i is the example's own count of real tokens (the attention mask's sum), never the padded batch length.
* Padding positions get exactly zero noise. Prompt and response tokens both get noise.
* In a packed row, every segment (an example; a new one starts where ``position_ids`` restarts at 0) gets the scale
  of its own length, so an example receives the same noise distribution packed or alone.

Mechanism (the same everywhere): :func:`noise_in_forward` hands the batch's token mask (and packed position ids) to
a forward hook on the token-embedding module (reached through PEFT / DDP / FSDP wrappers) for the span of ONE
training forward, and removes it after. The noise is added inside the model's own forward, which matters under FSDP:
there the embedding weight is a shard outside the forward (computing the embeddings in the trainer fails, and with
the parameters gathered by hand the embedding's gradient is lost — both shown on CPU in tests/test_fsdp_cpu.py).
The hook adds noise only in training mode with autograd recording, so evaluation, generation and reference passes
stay clean even inside the span. tunesmith's trainers use it through :class:`NEFTuneTrainerMixin`; other trainers
(TRL) through :class:`NEFTuneCallback`.

This differs from transformers' built-in ``neftune_noise_alpha`` hook, which scales by the padded (or packed) length
of the whole batch and noises padding too (transformers issue 34659).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Literal

import torch

from tunesmith.config import NEFTuneArgs

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


def noised(output: torch.Tensor, token_mask: torch.Tensor | None, alpha: float,
           distribution: Distribution = "uniform", position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``output`` (token embeddings, batch x seq x d) plus NEFTune noise for the given real-token mask / positions."""
    if token_mask is None or token_mask.shape != output.shape[:2]:
        token_mask = torch.ones(output.shape[:2], dtype=torch.float32, device=output.device)
    if position_ids is not None and position_ids.shape != output.shape[:2]:
        position_ids = None
    scale = noise_scale(token_mask.to(output.device), output.shape[-1], alpha,
                        None if position_ids is None else position_ids.to(output.device))
    return output + sample_noise(output.shape, scale, distribution).to(output.dtype)


@contextmanager
def noise_in_forward(model: torch.nn.Module, token_mask: torch.Tensor | None, alpha: float,
                     distribution: Distribution = "uniform", position_ids: torch.Tensor | None = None):
    """``with noise_in_forward(model, mask, alpha): model(...)``: the forwards run inside get NEFTune noise on the
    token embeddings (training mode, autograd on), with L_i from ``token_mask`` (per packed segment with
    ``position_ids``). The hook is removed on exit."""

    def neftune_hook(module, args, output):
        if not module.training or not torch.is_grad_enabled():
            return output
        return noised(output, token_mask, alpha, distribution, position_ids)

    handle = input_embedding_module(model).register_forward_hook(neftune_hook)
    try:
        yield
    finally:
        handle.remove()


def add_noise_to_batch(model: torch.nn.Module, batch: dict, alpha: float,
                       distribution: Distribution = "uniform", generator: torch.Generator | None = None) -> dict:
    """Return a copy of ``batch`` whose ``input_ids`` are replaced by noised ``inputs_embeds`` (for custom loops on an
    unsharded model; trainers use :func:`noise_in_forward`, which also works under FSDP).

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


def seed_rank_stream(args) -> None:
    """The one per-rank seeding rule for NEFTune's noise (the mixin and :class:`NEFTuneCallback` both apply it when
    training begins). The noise is drawn from torch's generator, which the Trainer seeds with the same ``seed`` on
    every rank, so every rank would draw the same noise for batches of the same shape: rank r > 0 reseeds it with
    ``seed + r`` (rank 0 keeps its stream: a single process is unchanged). Runs stay reproducible, and a resumed run
    continues each rank's stream: the Trainer saves every rank's generator state in checkpoints and restores it after
    ``on_train_begin``."""
    if args.process_index > 0:
        torch.manual_seed(args.seed + args.process_index)  # CPU and every CUDA device


def rank_seed_callback():
    """A TrainerCallback applying :func:`seed_rank_stream` when training begins (NEFTune under DDP)."""
    from transformers import TrainerCallback

    class RankNoiseSeed(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seed_rank_stream(args)

    return RankNoiseSeed()


class NEFTuneTrainerMixin:
    """For ``transformers.Trainer`` subclasses: ``with self.noise(model, inputs):`` around a training step's forward
    adds per-example NEFTune noise (training passes only), and transformers' own hook (padded length, noised padding)
    is kept off. Takes the config's NEFTune part as the ``neftune`` keyword argument (:class:`NEFTuneArgs`; None, or
    an alpha of None or 0, is off). The batch's ``token_mask`` (packed rows) or ``attention_mask`` gives L_i;
    ``position_ids`` split packed rows into examples. Under DDP each rank draws its own noise
    (:func:`rank_seed_callback`)."""

    def __init__(self, *args, neftune: NEFTuneArgs | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.neftune_noise_alpha = None  # Trainer.train attaches its built-in hook when this is set
        self.neftune = neftune if neftune is not None else NEFTuneArgs()
        if self.neftune.neftune_noise_alpha:
            self.add_callback(rank_seed_callback())

    def noise(self, model: torch.nn.Module, inputs: dict):
        alpha = self.neftune.neftune_noise_alpha
        if not (alpha and model.training):
            return nullcontext()
        mask = inputs.get("token_mask")
        if mask is None:
            mask = inputs.get("attention_mask")
        return noise_in_forward(model, mask, alpha, self.neftune.neftune_noise_distribution, inputs.get("position_ids"))


# ------------------------------------------------------------------------------------------------ other trainers

from transformers import TrainerCallback  # noqa: E402  (only the drop-in below needs transformers)


class NEFTuneCallback(TrainerCallback):
    """Exact NEFTune for trainers tunesmith does not own: TRL's ``SFTTrainer`` and ``DPOTrainer`` (any
    ``transformers.Trainer``). Add it as a callback and leave the trainer's own ``neftune_noise_alpha`` unset::

        from tunesmith.neftune import NEFTuneCallback
        trainer = SFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds,
                             callbacks=[NEFTuneCallback(alpha=5)])     # or DPOTrainer(..., callbacks=[...])

    Why hooks on the model here: TRL's trainers build the forward call inside
    their own loss code (DPO concatenates chosen and rejected rows itself), so there is no place to hand them noised
    embeddings without rewriting that code. Instead, for the span of ``train()`` only:

    * a forward pre-hook on the model reads the batch's ``attention_mask`` / ``position_ids`` (padded, packed or
      TRL's padding-free rows) from the forward call's keyword arguments;
    * a forward hook on the token-embedding module (reached through PEFT / DDP / FSDP wrappers) adds
      ``alpha / sqrt(L_i * d) * eps`` with L_i the example's own real-token count (per packed segment), zero on padding
      — the same :func:`noise_scale` / :func:`sample_noise` as everywhere else in tunesmith.

    Noise is added only when the model is in training mode AND autograd is recording, so evaluation, generation and
    the reference pass of a preference loss (TRL runs it under ``torch.no_grad()``, whether it uses a separate
    reference model or the policy with its adapter disabled) stay noise-free. Under DDP each rank draws its own noise
    (:func:`seed_rank_stream`, the rule tunesmith's own trainers follow). The hooks are removed at the end of
    training. Nothing in TRL or transformers is patched.
    """

    def __init__(self, alpha: float, distribution: Distribution = "uniform"):
        if not alpha > 0:
            raise ValueError(f"NEFTune alpha must be > 0, got {alpha}")
        if distribution not in ("uniform", "gaussian"):
            raise ValueError(f"distribution must be 'uniform' or 'gaussian', got {distribution!r}")
        self.alpha, self.distribution = float(alpha), distribution
        self._handles: list = []
        self._batch: dict | None = None

    # ---- hooks

    def _read_batch(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._batch = {"input_ids": ids, "attention_mask": kwargs.get("attention_mask"),
                       "position_ids": kwargs.get("position_ids")}

    def _forget_batch(self, module, args, kwargs, output):
        self._batch = None

    def _noise(self, module, args, output):
        batch = self._batch
        if batch is None or not module.training or not torch.is_grad_enabled():
            return output
        mask = batch["attention_mask"]
        return noised(output, mask if mask is not None and mask.dim() == 2 else None, self.alpha, self.distribution,
                      batch["position_ids"])

    def attach(self, model: torch.nn.Module) -> None:
        """Register the hooks on ``model`` (done by ``on_train_begin``; public for custom training loops)."""
        self.detach()
        embedding = input_embedding_module(model)
        self._handles = [
            model.register_forward_pre_hook(self._read_batch, with_kwargs=True),
            model.register_forward_hook(self._forget_batch, with_kwargs=True, always_call=True),
            embedding.register_forward_hook(self._noise),
        ]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._batch = [], None

    # ---- TrainerCallback events

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if getattr(args, "neftune_noise_alpha", None):
            raise ValueError("NEFTuneCallback: unset the trainer's own neftune_noise_alpha (transformers' hook scales "
                             "by the padded batch length and noises padding); the callback adds exact NEFTune")
        self.attach(model)
        seed_rank_stream(args)  # each rank its own noise, as in tunesmith's own trainers
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.detach()
        return control
