"""NEFTune: the exact per-example formula, its statistics, packing invariance, training-only presence, and how it
differs from transformers' built-in hook."""
import math

import pytest
import torch

from conftest import sft_config
from tunesmith.config import NEFTuneArgs
from tunesmith.models import load_for_training
from tunesmith.neftune import add_noise_to_batch, noise_scale, sample_noise
from tunesmith.selftest.probes import NoiseProbe

ALPHA = 5.0


def reference_noise(shape, mask, alpha, generator):
    """The NEFTune authors' training-loop code, written out independently (attention-mask based)."""
    noise = torch.zeros(shape).uniform_(-1, 1, generator=generator)
    delta = noise * mask.unsqueeze(2)
    dims = mask.sum(1) * shape[-1]
    mag = alpha / torch.sqrt(dims)
    return delta * mag.view(-1, 1, 1)


def test_noise_equals_reference_formula_elementwise():
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    shape = torch.Size([3, 7, 16])
    ours = sample_noise(shape, noise_scale(mask, 16, ALPHA), "uniform", torch.Generator().manual_seed(3))
    ref = reference_noise(shape, mask.float(), ALPHA, torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-7)
    assert (ours[1, 4:] == 0).all() and (ours[2, 2:] == 0).all()  # padding: exactly zero


def test_add_noise_to_batch_uses_the_real_embedding_and_global_seed():
    emb = torch.nn.Embedding(50, 16)
    model = torch.nn.Module()
    model.get_input_embeddings = lambda: emb
    ids = torch.randint(0, 50, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    torch.manual_seed(11)
    out = add_noise_to_batch(model, {"input_ids": ids, "attention_mask": mask}, ALPHA)
    torch.manual_seed(11)
    ref = reference_noise(torch.Size([2, 5, 16]), mask.float(), ALPHA, None)
    assert "input_ids" not in out and torch.equal(out["attention_mask"], mask)
    torch.testing.assert_close(out["inputs_embeds"] - emb(ids), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("distribution,var_factor", [("uniform", 1 / 3), ("gaussian", 1.0)])
def test_noise_statistics(distribution, var_factor):
    d, lengths, width = 64, [3, 10, 25], 25
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    scale = noise_scale(mask, d, ALPHA)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_noise(torch.Size([3, width, d]), scale, distribution, g) for _ in range(200)])
    for i, n in enumerate(lengths):
        x = draws[:, i, :n].flatten()
        bound = ALPHA / math.sqrt(n * d)
        if distribution == "uniform":
            assert x.abs().max() <= bound + 1e-7
        expected_var = var_factor * bound ** 2
        assert abs(x.mean().item()) < 4 * math.sqrt(expected_var / x.numel())
        assert x.var().item() == pytest.approx(expected_var, rel=0.03)
        assert (draws[:, i, n:] == 0).all()


def test_packed_example_gets_its_own_length_scale():
    d = 32
    alone = [noise_scale(torch.ones(1, n), d, ALPHA)[0] for n in (3, 5)]
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0, 1]])  # two examples, then a 2-token padding tail
    token_mask = torch.tensor([[1] * 8 + [0] * 2])
    packed = noise_scale(token_mask, d, ALPHA, position_ids=pos)[0]
    torch.testing.assert_close(packed[:3], alone[0])
    torch.testing.assert_close(packed[3:8], alone[1])
    assert (packed[8:] == 0).all()
    assert packed.dtype == torch.float32


def test_builtin_transformers_hook_differs_on_padded_batch():
    """transformers' hook scales by the padded length and noises padding; ours does neither."""
    from transformers.integrations.neftune import neftune_post_forward_hook

    emb = torch.nn.Embedding(10, 16)
    emb.neftune_noise_alpha = ALPHA
    emb.train()
    ids = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.tensor([[1] * 8, [1] * 2 + [0] * 6])
    clean = emb(ids)
    builtin = neftune_post_forward_hook(emb, (ids,), clean) - clean
    ours = sample_noise(clean.shape, noise_scale(mask, 16, ALPHA))
    assert builtin[1, 2:].abs().max() > 0  # the built-in hook noises padding
    assert (ours[1, 2:] == 0).all()
    padded_bound, real_bound = ALPHA / math.sqrt(8 * 16), ALPHA / math.sqrt(2 * 16)
    assert builtin[1, :2].abs().max() <= padded_bound + 1e-6  # scaled by the padded length 8 ...
    assert ours[1, :2].abs().max() > padded_bound  # ... ours by the example's own length 2
    assert ours[1, :2].abs().max() <= real_bound + 1e-6


@pytest.mark.parametrize("variant", [
    {}, {"use_peft": True}, {"load_in_4bit": True}, {"gradient_checkpointing": True},
    {"packing": True}, {"gradient_accumulation_steps": 2},
])
def test_noise_in_every_training_step_and_never_in_eval(tiny_model_dir, alpaca_file, tmp_path, variant):
    from tunesmith.recipes import sft
    from tunesmith.data.collate import Collator, pack
    from tunesmith.models import ensure_pad_token, load_tokenizer

    cfg = sft.SFTConfig(**sft_config(tiny_model_dir, alpaca_file, tmp_path / "o", neftune_noise_alpha=ALPHA,
                                     max_steps=4, **variant))
    tok = load_tokenizer(tiny_model_dir)
    ensure_pad_token(tok)
    template, train_set, summary, _, _ = sft.prepare_data(cfg, tok)
    rows = pack(train_set, cfg.data.max_length) if cfg.data.packing else train_set
    model = load_for_training(cfg)
    trainer = sft.TunesmithTrainer(model=model, args=cfg.training, train_dataset=rows,
                                   eval_dataset={"train": train_set[:4]},
                                   data_collator=Collator(tok.pad_token_id), processing_class=tok,
                                   neftune=NEFTuneArgs(ALPHA))
    probe = NoiseProbe(trainer.model)
    trainer.train()
    train_events = list(probe.events)
    probe.events.clear()
    trainer.evaluate()
    eval_events = list(probe.events)
    probe.close()

    steps = 4 * cfg.training.gradient_accumulation_steps
    assert len(train_events) == steps and all(kind == "noised" for kind, _ in train_events)
    d = model.get_input_embeddings().weight.shape[1]
    for _, (noise, mask) in train_events:
        if mask is not None:  # padded rows: each row bounded by its own length, zero on padding
            lengths = mask.sum(1)
            assert (noise[mask == 0] == 0).all()
            for i, n in enumerate(lengths.tolist()):
                assert 0 < noise[i, :n].abs().max() <= ALPHA / math.sqrt(n * d) + 1e-6
        else:
            assert noise.abs().max() > 0
    assert eval_events and all(kind == "clean" for kind, _ in eval_events)
    hooks = trainer.model.get_input_embeddings()._forward_hooks.values()
    assert not any("neftune" in getattr(h, "__qualname__", str(h)).lower() for h in hooks)  # nothing left behind


def test_eval_loss_identical_with_and_without_neftune(tiny_model_dir, alpaca_file, tmp_path):
    from tunesmith.recipes import sft
    from tunesmith.data.collate import Collator
    from tunesmith.models import ensure_pad_token, load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    ensure_pad_token(tok)
    cfg = sft.SFTConfig(**sft_config(tiny_model_dir, alpaca_file, tmp_path / "o"))
    _, train_set, _, _, _ = sft.prepare_data(cfg, tok)
    model = load_for_training(cfg)
    results = []
    for alpha in (None, ALPHA):
        trainer = sft.TunesmithTrainer(model=model, args=cfg.training, train_dataset=train_set,
                                       eval_dataset={"train": train_set[:8]},
                                       data_collator=Collator(tok.pad_token_id), processing_class=tok,
                                       neftune=NEFTuneArgs(alpha))
        model.train()  # even a model left in training mode is evaluated noise-free
        results.append(trainer.evaluate()["eval_train_loss"])
        prompt = torch.tensor([train_set[0]["input_ids"][:10]])
        model.eval()
        results.append(model.generate(prompt, max_new_tokens=8, do_sample=False).tolist())
    assert results[0] == results[2] and results[1] == results[3]


def test_saved_model_carries_no_trace(tiny_model_dir, alpaca_file, tmp_path):
    import json

    from tunesmith.recipes import sft

    out = sft.train(sft_config(tiny_model_dir, alpaca_file, tmp_path / "o", neftune_noise_alpha=ALPHA, max_steps=2))
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert not any("neftune" in k for k in config)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert not model.get_input_embeddings()._forward_hooks
