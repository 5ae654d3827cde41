"""The preference trainer: ``transformers.Trainer`` with a pairwise loss on summed answer log-probs against reference
log-probs stored with the pairs (no reference model in memory), NEFTune on the policy pass only, and evaluation of
reward accuracy and margins."""
from __future__ import annotations

import torch
from transformers import Trainer

from tunesmith.models import eval_mode
from tunesmith.neftune import NEFTuneTrainerMixin
from tunesmith.preference.loss import LossSettings, preference_loss
from tunesmith.preference.pairs import PAIR_KEYS, REF_KEYS, pair_logps

# what metrics.jsonl gets at every log step (means over the pairs since the last log, over every process)
STATS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen", "logps/rejected")


def _pair_stats(logps, r_w, r_l) -> torch.Tensor:
    """Per-statistic sums over the batch's pairs (in :data:`STATS` order), float64."""
    margin = r_w - r_l
    rows = [r_w, r_l, margin, (margin > 0).to(margin.dtype), logps.chosen.detach(), logps.rejected.detach()]
    return torch.stack([x.double().sum() for x in rows])


class PreferenceTrainer(NEFTuneTrainerMixin, Trainer):
    """``loss``: the :class:`~tunesmith.preference.loss.LossSettings`. Batches come from
    :class:`~tunesmith.preference.pairs.PairCollator` (the reference's log-probs inside, unless the loss needs
    none)."""

    def __init__(self, *args, loss: LossSettings, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_settings = loss
        self.model_accepts_loss_kwargs = False  # a per-pair mean: the Trainer scales it for gradient accumulation
        self._sums: torch.Tensor | None = None  # STATS sums, then the pair count
        
    def _set_signature_columns_if_needed(self):
        self._signature_columns = list(PAIR_KEYS + REF_KEYS)  # kept if remove_unused_columns is set

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self.noise(model, inputs):
            logps = pair_logps(model, inputs)
        losses, r_w, r_l = preference_loss(logps, inputs.get("ref_chosen"), inputs.get("ref_rejected"),
                                           self.loss_settings)
        if model.training:
            sums = torch.cat([_pair_stats(logps, r_w, r_l), torch.tensor([float(len(losses))], dtype=torch.float64,
                                                                          device=losses.device)])
            self._sums = sums if self._sums is None else self._sums + sums
        loss = losses.mean()
        return (loss, {"margin": r_w - r_l}) if return_outputs else loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if self._sums is not None and "loss" in logs:  # every process logs at the same steps: reduce here
            sums = self._all_reduce(self._sums)
            self._sums = None
            logs = {**logs, **{k: v / sums[-1] for k, v in zip(STATS, sums[:-1])}}
        super().log(logs, start_time)

    def _all_reduce(self, sums: torch.Tensor) -> list[float]:
        if self.args.world_size > 1 and torch.distributed.is_initialized():
            sums = sums.to(self.args.device)
            torch.distributed.all_reduce(sums)
        return sums.cpu().tolist()

    @torch.no_grad()
    def pair_metrics(self, pairs) -> dict:
        """Noise-free loss, reward margin and accuracy, and mean answer log-probs over ``pairs`` (every process
        scores its share, rows rank, rank + world, ...; all get the whole set's figures)."""
        args, model = self.args, self.model
        mine = pairs.select(range(args.process_index, len(pairs), args.world_size)) if hasattr(pairs, "select") \
            else pairs[args.process_index::args.world_size]
        total = torch.zeros(len(STATS) + 2, dtype=torch.float64)
        with eval_mode(model):
            for start in range(0, len(mine), args.per_device_eval_batch_size):
                rows = mine[start:start + args.per_device_eval_batch_size]
                if isinstance(rows, dict):
                    rows = [dict(zip(rows, values)) for values in zip(*rows.values())]
                batch = {k: v.to(args.device) for k, v in self.data_collator(rows).items()}
                logps = pair_logps(model, batch)
                losses, r_w, r_l = preference_loss(logps, batch.get("ref_chosen"), batch.get("ref_rejected"),
                                                   self.loss_settings)
                total += torch.cat([_pair_stats(logps, r_w, r_l).cpu(),
                                    torch.tensor([losses.double().sum().item(), float(len(losses))])])
        sums = self._all_reduce(total)
        n = sums[-1] or float("nan")
        return {"loss": sums[-2] / n, **{k: v / n for k, v in zip(STATS, sums[:-2])}}

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        sets = eval_dataset if eval_dataset is not None else self.eval_dataset
        if sets is None:
            return {}
        if not isinstance(sets, dict):
            sets = {"": sets}
        metrics = {}
        for name, pairs in sets.items():
            prefix = f"{metric_key_prefix}_{name}_" if name else f"{metric_key_prefix}_"
            metrics.update({prefix + k: v for k, v in self.pair_metrics(pairs).items()})
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        return metrics
