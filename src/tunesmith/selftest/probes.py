"""Probes that observe a model without changing it, shared by the self-test and the tests."""
from __future__ import annotations

import torch


class NoiseProbe:
    """Observes (without changing anything) the clean token embeddings and what the first decoder layer receives.

    ``events`` gets one entry per forward: ``("noised", (noise, attention_mask))`` when the first layer's input
    differs from the clean embeddings (``noise`` = the difference, in float32; the mask as the decoder got it, None
    for packed rows), else ``("clean", None)``. Works through PEFT / DDP wrappers on decoders that keep their
    blocks in a ``layers`` list (Llama, Mistral, Qwen, ...). ``close()`` removes the hooks.
    """

    def __init__(self, model: torch.nn.Module):
        from tunesmith.neftune import input_embedding_module

        base = next(m for m in model.modules() if isinstance(getattr(m, "layers", None), torch.nn.ModuleList))
        self.events: list = []
        self._clean = self._mask = None
        self.handles = [
            input_embedding_module(model).register_forward_hook(self._on_embed),  # registered first: sees clean
            base.register_forward_pre_hook(self._on_base, with_kwargs=True),
            base.layers[0].register_forward_pre_hook(self._on_layer, with_kwargs=True),
        ]

    def _on_embed(self, module, args, output):
        self._clean = output.detach().clone()

    def _on_base(self, module, args, kwargs):
        self._mask = kwargs.get("attention_mask")

    def _on_layer(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        noise = hidden.detach().float() - self._clean.float()  # exact for 16-bit values
        self.events.append(("noised", (noise, self._mask)) if noise.abs().max() > 0 else ("clean", None))

    def close(self) -> None:
        for h in self.handles:
            h.remove()
