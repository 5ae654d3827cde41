"""The SFT trainer: per-example NEFTune on training passes, the causal-LM loss with lean logits (no batch x sequence x
vocabulary tensor, see ``tunesmith.scoring``), token-weighted noise-free evaluation."""
from __future__ import annotations

from transformers import Trainer

from tunesmith.neftune import NEFTuneTrainerMixin
from tunesmith.scoring import causal_lm_loss, needs_one_row, one_row, rows_loss


class TunesmithTrainer(NEFTuneTrainerMixin, Trainer):
    """Trainer with per-example NEFTune noise on training passes, the lean causal-LM loss and token-weighted,
    noise-free evaluation."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The loss is scoring.causal_lm_loss, normalised by num_items_in_batch whatever the model's forward accepts:
        # the Trainer then counts the trained tokens across gradient accumulation and processes for every model.
        self.model_accepts_loss_kwargs = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if needs_one_row(model, inputs):  # packed rows under FlashAttention: one row, before the noise reads it
            inputs = one_row(inputs)
        with self.noise(model, inputs):
            # No KV cache (scoring.model_inputs): packed rows are isolated by position_ids only without one.
            loss = causal_lm_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts the tokens of every process while DDP averages the gradients over them
            # (the same scaling as Trainer.compute_loss)
            scale = self.accelerator.num_processes // self.get_tp_size()
            loss = loss * (scale if self.args.n_gpu <= 1 else self.args.n_gpu)
        return (loss, None) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        sets = eval_dataset if eval_dataset is not None else self.eval_dataset
        if sets is None:
            return {}
        if not isinstance(sets, dict):
            sets = {"": sets}
        metrics = {}
        show = self.is_world_process_zero() and not self.args.disable_tqdm
        for name, data in sets.items():
            what = {"train": "training examples", "eval": "held-out examples"}.get(name, f"{name or 'eval'} examples")
            result = rows_loss(self.model, data, self.data_collator, self.args.per_device_eval_batch_size,
                               self.args.device, self.args.process_index, self.args.world_size,
                               desc=f"noise-free loss, {len(data)} {what}" if show else None)
            prefix = f"{metric_key_prefix}_{name}_" if name else f"{metric_key_prefix}_"
            metrics[prefix + "loss"] = result["loss"]
            metrics[prefix + "perplexity"] = result["perplexity"]
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        return metrics

