"""NEFTuneCallback on a plain transformers.Trainer under torchrun: records the noise each rank adds at its first
training step (every rank gets examples of the same length, so equal streams would give equal noise).

usage: torchrun --nproc_per_node 2 neftune_callback_worker.py MODEL_DIR OUT_DIR
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from tunesmith.neftune import NEFTuneCallback, input_embedding_module


class NoiseProbe(TrainerCallback):
    """Added after NEFTuneCallback: its hook runs after the noise hook and records output - clean embedding."""

    def __init__(self):
        self.noise = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        embedding = input_embedding_module(model)

        def record(module, inputs, output):
            if module.training and torch.is_grad_enabled():
                self.noise.append((output - module.weight[inputs[0]]).detach().float())

        embedding.register_forward_hook(record)


if __name__ == "__main__":
    model_dir, out = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rows = [{"input_ids": list(range(5 + i, 17 + i)), "labels": list(range(5 + i, 17 + i))} for i in range(8)]
    probe = NoiseProbe()
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=2, max_steps=1, use_cpu=True,
                             report_to="none", save_strategy="no", seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[NEFTuneCallback(alpha=5.0), probe])
    trainer.train()
    noise = probe.noise[0]  # (output - clean) carries float32 rounding of the rank's own embeddings: compare closely
    with open(f"{out}/noise.rank{args.process_index}.json", "w") as f:
        json.dump({"noise": noise.reshape(-1).tolist(), "shape": list(noise.shape)}, f)
