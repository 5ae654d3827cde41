"""Issue 10 items 9, 10, 13: classifiers load safetensors only; a decoder-only classifier pools the same token in a
noised training pass as in evaluation; NEFTune noise differs across DDP ranks and stays reproducible."""
import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from conftest import build_tokenizer
from tunesmith.config import NEFTuneArgs
from tunesmith.cli import main
from tunesmith.errors import UserError


@pytest.fixture(scope="module")
def decoder_classifier(tmp_path_factory):
    """A tiny Llama sequence classifier whose tokenizer pads on the right (the default), saved as safetensors."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    path = tmp_path_factory.mktemp("llama-cls")
    tok = build_tokenizer(path)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(path)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=2, pad_token_id=tok.pad_token_id, id2label={0: "neg", 1: "pos"},
        label2id={"neg": 0, "pos": 1}))
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def test_right_padded_decoder_classifier_pools_the_same_token_under_neftune(decoder_classifier, tmp_path):
    from transformers import DataCollatorWithPadding, TrainingArguments

    from tunesmith.recipes.classify.trainer import ClassifierTrainer, load_classifier

    model, tok, _ = load_classifier(decoder_classifier)
    assert tok.padding_side == "right"
    texts = ["the cat sat on the mat and it was happy", "red", "blue sky", "a dog ran on one two three"]
    batch = DataCollatorWithPadding(tok)([dict(tok(t), labels=i % 2) for i, t in enumerate(texts)])
    assert (batch["attention_mask"][:, -1] == 0).any()  # real right padding
    with torch.no_grad():
        model.eval()
        expected = model(**batch).logits  # evaluation: pools the last real token found from input_ids
        model.train()  # no dropout in this config: training differs only by the noise
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
        trainer = ClassifierTrainer(model=model, args=args, neftune=NEFTuneArgs(1e-9))  # noise far below float32 eps
        _, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
    torch.testing.assert_close(outputs.logits, expected, atol=1e-5, rtol=1e-4)
    # noise passed as inputs_embeds (the old way) pools the last position, a pad: what the fix prevents
    from tunesmith.neftune import add_noise_to_batch

    with torch.no_grad():
        pooled_pad = model(**add_noise_to_batch(model, dict(batch), 1e-9)).logits
    assert not torch.allclose(pooled_pad, expected, atol=1e-3)


def test_classify_and_predict_load_safetensors_only(decoder_classifier, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    from tunesmith.recipes.classify.trainer import load_classifier

    pickled = tmp_path / "pickled"
    shutil.copytree(decoder_classifier, pickled)
    model = AutoModelForSequenceClassification.from_pretrained(pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")  # the pickle format
    assert not list(pickled.glob("*.safetensors"))
    AutoModelForSequenceClassification.from_pretrained(pickled)  # transformers alone would load it
    with pytest.raises(UserError, match=r"pickled: cannot load the model"):
        load_classifier(str(pickled))
    capsys.readouterr()
    assert main(["predict", "--model_name_or_path", str(pickled), "--text", "hello"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot load the model" in err
    rows = tmp_path / "t.jsonl"
    pairs = (("good", "pos"), ("bad", "neg"))
    rows.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in pairs))
    assert main(["classify", "--model_name_or_path", str(pickled), "--dataset", str(rows), "--output_dir",
                 str(tmp_path / "out"), "--use_cpu", "true"]) == 2
    assert "cannot load the model" in capsys.readouterr().err
    torn = tmp_path / "torn"
    shutil.copytree(decoder_classifier, torn)
    weights = torn / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match=r"torn: cannot load model \(model.safetensors is truncated"):
        load_classifier(str(torn))


# ---------------------------------------------------------------- item 13: NEFTune noise under DDP


def noise_on_rank(rank: int, seed: int = 0) -> torch.Tensor:
    """What rank ``rank`` of a DDP run adds to the same batch at its first step: the Trainer seeds every rank with
    ``seed``; then the mixin's callback runs at train begin; then the noise is drawn."""
    from transformers import set_seed

    from tunesmith.neftune import add_noise_to_batch, rank_seed_callback

    set_seed(seed)
    rank_seed_callback().on_train_begin(SimpleNamespace(process_index=rank, seed=seed), None, None)
    emb = torch.nn.Embedding(20, 8)
    with torch.no_grad():
        emb.weight.zero_()  # the noised embedding is the noise itself
    model = SimpleNamespace(get_input_embeddings=lambda: emb)
    batch = {"input_ids": torch.tensor([[1, 2, 3, 4]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        return add_noise_to_batch(model, batch, alpha=5.0)["inputs_embeds"]


def test_neftune_noise_differs_across_ranks_and_is_reproducible():
    r0, r1, r2 = noise_on_rank(0), noise_on_rank(1), noise_on_rank(2)
    assert r0.abs().sum() > 0 and not torch.equal(r0, r1) and not torch.equal(r1, r2)
    assert torch.equal(noise_on_rank(1), r1) and torch.equal(noise_on_rank(0), r0)  # reproducible per rank
    assert not torch.equal(noise_on_rank(1, seed=7), r1)


def test_trainer_registers_the_rank_seed_only_with_neftune(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from tunesmith.recipes.sft.trainer import TunesmithTrainer

    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    names = lambda t: [type(c).__name__ for c in t.callback_handler.callbacks]  # noqa: E731
    assert "RankNoiseSeed" in names(TunesmithTrainer(model=model, args=args, neftune=NEFTuneArgs(5.0)))
    assert "RankNoiseSeed" not in names(TunesmithTrainer(model=model, args=args))
