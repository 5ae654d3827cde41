"""The SFT trainer: per-example NEFTune on training passes, token-weighted noise-free evaluation."""
from __future__ import annotations

from transformers import Trainer

from tunesmith.neftune import NEFTuneTrainerMixin
from tunesmith.scoring import rows_loss

class TunesmithTrainer(NEFTuneTrainerMixin, Trainer):
    """Trainer with per-example NEFTune noise on training passes and token-weighted, noise-free evaluation."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self.noise(model, inputs):
            inputs = {k: v for k, v in inputs.items() if k != "token_mask"}
            # No KV cache in training: packed rows are isolated by position_ids only when no cache is in use.
            inputs["use_cache"] = False
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        sets = eval_dataset if eval_dataset is not None else self.eval_dataset
        if sets is None:
            return {}
        if not isinstance(sets, dict):
            sets = {"": sets}
        metrics = {}
        for name, data in sets.items():
            result = rows_loss(self.model, data, self.data_collator, self.args.per_device_eval_batch_size,
                               self.args.device, self.args.process_index, self.args.world_size)
            prefix = f"{metric_key_prefix}_{name}_" if name else f"{metric_key_prefix}_"
            metrics[prefix + "loss"] = result["loss"]
            metrics[prefix + "perplexity"] = result["perplexity"]
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        return metrics

