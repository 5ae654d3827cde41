"""tunesmith.neftune.NEFTuneCallback inside TRL's own trainers: the noise each example receives is checked against
NEFTune's formula, computed here from the batch the trainer actually ran (not with tunesmith's code)."""
import math

import pytest
import torch

from tunesmith.neftune import NEFTuneCallback

ALPHA = 5.0


class NoiseProbe:
    """Records, for every forward pass of ``model``, the batch it was given and the noise its first decoder layer
    received (that layer's input minus the clean embedding of the same ids)."""

    def __init__(self, model):
        self.model, self.records, self._batch = model, [], None
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.embedding = inner.get_input_embeddings()
        self.handles = [model.register_forward_pre_hook(self._read, with_kwargs=True),
                        inner.model.layers[0].register_forward_pre_hook(self._layer0, with_kwargs=True)]

    def _read(self, module, args, kwargs):
        self._batch = {k: kwargs.get(k) for k in ("input_ids", "attention_mask", "position_ids")}

    def _layer0(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        with torch.no_grad():
            clean = self.embedding.weight[self._batch["input_ids"]]
        self.records.append({**self._batch, "noise": (hidden.detach() - clean).float(),
                             "training": module.training, "grad": torch.is_grad_enabled()})

    def remove(self):
        for h in self.handles:
            h.remove()


def expected_scale_per_token(attention_mask, position_ids, d):
    """alpha / sqrt(L * d) per token, L = the token's example length, 0 on padding: plain Python loops."""
    rows = []
    ids_shape = (attention_mask if attention_mask is not None else position_ids).shape
    for r in range(ids_shape[0]):
        mask = [1] * ids_shape[1] if attention_mask is None else attention_mask[r].tolist()
        if position_ids is None:
            segs = [0] * ids_shape[1]
        else:
            segs, k = [], -1
            for p in position_ids[r].tolist():
                k += p == 0
                segs.append(k)
        lengths = {}
        for s, m in zip(segs, mask):
            lengths[s] = lengths.get(s, 0) + m
        rows.append([ALPHA / math.sqrt(lengths[s] * d) if m else 0.0 for s, m in zip(segs, mask)])
    return rows


def check_noise_matches_formula(record, d):
    scale = expected_scale_per_token(record["attention_mask"], record["position_ids"], d)
    noise = record["noise"]
    groups = {}
    for r, row in enumerate(scale):
        for t, s in enumerate(row):
            if s == 0.0:
                assert torch.count_nonzero(noise[r, t]) == 0, "padding got noise"
            else:
                groups.setdefault((r, s), []).append(noise[r, t])
    assert groups
    for (_, s), vectors in groups.items():
        x = torch.stack(vectors).flatten()
        assert x.abs().max().item() <= s * (1 + 1e-5)  # U(-1, 1) * scale: never beyond the scale
        assert x.abs().max().item() > 0.9 * s  # ... and reaching it (P(miss) < 0.9^(L*d), L*d >= 64)
        assert (x ** 2).mean().item() == pytest.approx(s ** 2 / 3, rel=0.3)  # uniform: E[u^2] = s^2 / 3


def sft_dataset(n=12):
    from datasets import Dataset

    words = "the cat sat on a red mat and the dog ran to the blue sea".split()
    rows = [{"prompt": " ".join(words[: 2 + i % 7]) + " ?", "completion": " " + " ".join(words[i % 5: 6 + i])}
            for i in range(n)]
    return Dataset.from_list(rows)


def trl_sft(tiny_model_dir, tmp_path, **args):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = SFTConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_steps=2,
                       learning_rate=1e-3, report_to="none", bf16=False, use_cpu=True, save_strategy="no",
                       logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, **({"max_length": 64} | args))
    callback = NEFTuneCallback(alpha=ALPHA)
    trainer = SFTTrainer(model=model, args=config, train_dataset=sft_dataset(), processing_class=tokenizer,
                         callbacks=[callback])
    probe = NoiseProbe(model)
    trainer.train()
    return trainer, model, probe, callback


def test_sft_trainer_padded_rows_get_per_example_noise(tiny_model_dir, tmp_path):
    trainer, model, probe, _ = trl_sft(tiny_model_dir, tmp_path)
    d = model.config.hidden_size
    train = [r for r in probe.records if r["training"] and r["grad"]]
    assert len(train) >= 2
    for record in train:
        mask = record["attention_mask"]
        assert mask is not None and (mask == 0).any(), "the test needs padded rows"
        assert len(set(mask.sum(1).tolist())) > 1, "the test needs rows of different lengths"
        check_noise_matches_formula(record, d)

    # after training the hooks are gone: a training-mode forward is clean
    probe.records.clear()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    model.train()
    model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    assert torch.count_nonzero(probe.records[-1]["noise"]) == 0
    probe.remove()


def test_sft_trainer_padding_free_segments_get_their_own_length(tiny_model_dir, tmp_path):
    trainer, model, probe, _ = trl_sft(tiny_model_dir, tmp_path, padding_free=True, max_length=None)
    train = [r for r in probe.records if r["training"] and r["grad"]]
    assert train
    for record in train:
        pos = record["position_ids"]
        assert pos is not None and pos.shape[0] == 1 and int((pos == 0).sum()) > 1, "expected one row, many examples"
        check_noise_matches_formula(record, model.config.hidden_size)
    probe.remove()


def test_noise_only_when_training_with_autograd(tiny_model_dir):
    """Evaluation (eval mode) and a preference loss's reference pass (no_grad, even in train mode) stay clean."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    callback = NEFTuneCallback(alpha=ALPHA)
    callback.attach(model)
    probe = NoiseProbe(model)
    ids = torch.randint(5, 100, (2, 9))
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    model.train()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    model(input_ids=ids, attention_mask=mask)
    clean_eval, clean_reference, noised = (r["noise"] for r in probe.records)
    assert torch.count_nonzero(clean_eval) == 0 and torch.count_nonzero(clean_reference) == 0
    check_noise_matches_formula(probe.records[2], model.config.hidden_size)
    callback.detach()
    model(input_ids=ids, attention_mask=mask)
    assert torch.count_nonzero(probe.records[-1]["noise"]) == 0


def test_refuses_to_stack_on_transformers_hook(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="neftune_noise_alpha"):
        trl_sft(tiny_model_dir, tmp_path, neftune_noise_alpha=5.0)
