"""The SPIN trainer (pairwise loss against stored reference log-probs) and noise-free pair scoring."""
from __future__ import annotations

from collections import defaultdict

import torch
from transformers import Trainer

from tunesmith.models import eval_mode
from tunesmith.neftune import NEFTuneTrainerMixin
from tunesmith.recipes.spin.data import PairCollator
from tunesmith.recipes.spin.loss import spin_loss
from tunesmith.scoring import sequence_logprobs


class SPINTrainer(NEFTuneTrainerMixin, Trainer):
    """Trainer whose loss is SPIN's pairwise loss against stored reference log-probs (no reference model)."""

    def __init__(self, *args, beta: float, loss_type: str = "sigmoid", **kwargs):
        super().__init__(*args, **kwargs)
        self.beta, self.loss_type = beta, loss_type
        self.model_accepts_loss_kwargs = False  # a per-pair mean: let the Trainer scale it for accumulation
        self._stats: dict[str, list[float]] = defaultdict(list)

    def _set_signature_columns_if_needed(self):
        self._signature_columns = ["real", "generated", "ref_real", "ref_generated"]  # kept by remove_unused_columns

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rows = {k: inputs[k] for k in ("input_ids", "attention_mask", "labels")}
        with self.noise(model, rows):
            real, generated = sequence_logprobs(model, rows).chunk(2)
        losses, t = spin_loss(real, generated, inputs["ref_real"], inputs["ref_generated"], self.beta,
                              self.loss_type)
        if model.training:
            self._stats["rewards/margin"].append(t.mean().item())
            self._stats["rewards/accuracy"].append((t > 0).float().mean().item())
            self._stats["logps/real"].append(real.mean().item())
            self._stats["logps/generated"].append(generated.mean().item())
        loss = losses.mean()
        return (loss, {"margin": t}) if return_outputs else loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if self._stats and "loss" in logs:
            logs = {**logs, **{k: sum(v) / len(v) for k, v in self._stats.items()}}
            self._stats.clear()
        super().log(logs, start_time)


@torch.no_grad()
def score_pairs(model, pairs: list[dict], collator: PairCollator, batch_size: int, device) -> tuple[list, list]:
    """Noise-free summed answer log-probs of the real and generated row of every pair (in order)."""
    real, generated = [], []
    with eval_mode(model):
        for start in range(0, len(pairs), batch_size):
            batch = collator(pairs[start:start + batch_size])
            batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
            r, g = sequence_logprobs(model, batch).chunk(2)
            real += r.tolist()
            generated += g.tolist()
    return real, generated


