"""tunesmith.models: the one pad-token rule, loading (dtype, adapters, one-line errors), LoRA wrapping, the atomic
save of a model directory (umask modes), eval_mode and merge. The base-model checks run through the commands in
tests/test_base_model_checks.py; dtype auto and the shared model keys in tests/test_device_defaults.py."""
import os

import pytest
import torch

from conftest import fails, sft_config
from tunesmith.cli import main
from tunesmith.errors import UserError
from tunesmith.models import PAD_TOKEN, ensure_pad_token, eval_mode, save_model_dir
from tunesmith.recipes import sft


def test_pad_token_is_dedicated(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.pad_token is None
    assert ensure_pad_token(tok)
    assert tok.pad_token == PAD_TOKEN and tok.pad_token_id != tok.eos_token_id


def test_eval_mode_restores_the_previous_mode_even_on_error():
    model = torch.nn.Linear(2, 2).train()
    with pytest.raises(RuntimeError), eval_mode(model):
        assert not model.training
        raise RuntimeError
    assert model.training
    model.eval()
    with eval_mode(model):
        pass
    assert not model.training


class _Tiny(torch.nn.Module):
    def save_pretrained(self, path, safe_serialization=True):
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text("{}")
        (path / "model.safetensors").write_text("w")


def test_save_model_dir_never_leaves_a_partial_model(tmp_path):
    def crash(directory):
        raise OSError("disk full")

    with pytest.raises(OSError):
        save_model_dir(_Tiny(), None, tmp_path / "new", write=crash)
    assert not (tmp_path / "new").exists()  # the complete model is renamed into place, or nothing is
    run = tmp_path / "run"
    (run / "checkpoint-1").mkdir(parents=True)
    with pytest.raises(OSError):
        save_model_dir(_Tiny(), None, run, write=crash)
    assert not (run / "config.json").exists()  # an existing run directory: config.json only once all is written
    save_model_dir(_Tiny(), None, run, write=lambda d: (d / "extra.json").write_text("1"))
    assert {p.name for p in run.iterdir()} == {"checkpoint-1", "config.json", "model.safetensors", "extra.json"}


def test_saved_files_follow_the_umask(tmp_path, tiny_model_dir):
    import stat

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.io import atomic_write_text
    from tunesmith.models import save_model_dir

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    old = os.umask(0o027)
    try:
        save_model_dir(model, tok, tmp_path / "m")
        atomic_write_text(tmp_path / "t.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "m").st_mode) == 0o750
    for f in (tmp_path / "m").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o640, f
    assert stat.S_IMODE(os.stat(tmp_path / "t.txt").st_mode) == 0o640


def test_merge_folds_adapter_into_base(tiny_model_dir, alpaca_file, tmp_path):
    from tunesmith.models import load_model_and_tokenizer

    out = sft.train(sft_config(tiny_model_dir, alpaca_file, tmp_path / "lora", use_peft=True, max_steps=3,
                               learning_rate=1e-2))
    assert main(["merge", "--adapter", out, "--output", str(tmp_path / "merged")]) == 0
    peft_model, tok = load_model_and_tokenizer(out)
    merged, _ = load_model_and_tokenizer(str(tmp_path / "merged"))
    assert "adapter_config.json" not in os.listdir(tmp_path / "merged")
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, merged(ids).logits, atol=1e-5, rtol=1e-4)


def test_merge_never_deletes_a_directory_tunesmith_did_not_write(tiny_model_dir, alpaca_file, tmp_path, capsys):
    adapter = sft.train(sft_config(tiny_model_dir, alpaca_file, tmp_path / "lora", use_peft=True, max_steps=1,
                                   train_loss_eval_samples=0))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    fails(capsys, ["merge", "--adapter", adapter, "--output", str(mine)],
          r"mine: not empty and was not written by tunesmith")
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]
    (tmp_path / "mine.partial").mkdir()  # a name the old merge cleared for its temporary copy
    (tmp_path / "mine.partial" / "keep.txt").write_text("mine too")
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", adapter, "--output", str(merged)]) == 0
    assert main(["merge", "--adapter", adapter, "--output", str(merged)]) == 0  # its own output is replaced
    assert (merged / "model.safetensors").exists() and (tmp_path / "mine.partial" / "keep.txt").exists()
    fails(capsys, ["merge", "--adapter", adapter, "--output", adapter],  # nor the training run itself
          r"also this command's input 'adapter'")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left behind


def test_eos_pads_a_classifier_tokenizer_without_adding_a_token(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    size = len(tok)
    assert ensure_pad_token(tok, eos_pads=True) is False
    assert tok.pad_token == tok.eos_token and len(tok) == size
    tok = copy.deepcopy(tiny_tokenizer)
    tok.eos_token = None
    with pytest.raises(UserError, match="neither a pad nor an EOS token"):
        ensure_pad_token(tok, eos_pads=True)


def test_an_explicit_dtype_loads_the_weights_in_it_and_an_unknown_one_is_one_line(tiny_model_dir):
    from tunesmith.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(tiny_model_dir, "bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(UserError, match=r"unknown dtype 'half' \(choose float32, bfloat16, float16 or auto\)"):
        load_model_and_tokenizer(tiny_model_dir, "half")


def test_a_missing_model_directory_is_one_line(tmp_path):
    from tunesmith.models import load_model_and_tokenizer

    with pytest.raises(UserError, match=r"nope: model directory not found"):
        load_model_and_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty: cannot load tokenizer"):
        load_model_and_tokenizer(str(tmp_path / "empty"))


def test_an_adapter_directory_loads_its_base_with_the_adapter_applied(tiny_model_dir, tmp_path):
    from conftest import save_lora_adapter
    from tunesmith.models import load_model_and_tokenizer

    adapter = save_lora_adapter(tiny_model_dir, tmp_path / "adapter")
    base, base_tok = load_model_and_tokenizer(tiny_model_dir)
    model, tok = load_model_and_tokenizer(adapter)
    assert hasattr(model, "peft_config") and tok.pad_token == PAD_TOKEN == base_tok.pad_token
    assert model.get_input_embeddings().weight.shape[0] == len(tok)  # the base grew to the adapter's tokenizer
    assert model.config.pad_token_id == tok.pad_token_id
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        assert (model(ids).logits - base(ids).logits).abs().max() > 1e-3  # the adapter changes the answers


def test_wrap_lora_names_a_module_the_model_does_not_have(tiny_model_dir):
    from tunesmith.config import LoraArgs
    from tunesmith.models import load_model_and_tokenizer, wrap_lora

    model, _ = load_model_and_tokenizer(tiny_model_dir)
    with pytest.raises(UserError, match=r"field 'lora_target_modules': 'qproj': no module of this model has that name"):
        wrap_lora(model, LoraArgs(lora_target_modules=["q_proj", "qproj"]))
    with pytest.raises(UserError, match=r"field 'modules_to_save': 'classifier': no module"):
        wrap_lora(model, LoraArgs(lora_target_modules=["q_proj"], modules_to_save=["classifier"]))
    wrapped = wrap_lora(model, LoraArgs(lora_r=2))  # the default: all-linear, the output head left out
    adapted = {n.split(".lora_A")[0] for n, _ in wrapped.named_parameters() if ".lora_A" in n}
    assert any(n.endswith("q_proj") for n in adapted) and any(n.endswith("down_proj") for n in adapted)
    assert not any("lm_head" in n for n in adapted)
    assert [n for n, p in wrapped.named_parameters() if p.requires_grad and "lora_" not in n] == []


def test_disable_dropout_turns_every_dropout_off_but_keeps_the_config(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tunesmith.models import disable_dropout

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attention_dropout=0.3)
    model.model.extra = torch.nn.Dropout(0.5)  # any nn.Dropout, e.g. LoRA's
    assert {m.attention_dropout for m in model.modules() if hasattr(m, "attention_dropout")} == {0.3}
    disable_dropout(model.train())
    assert model.model.extra.p == 0.0
    assert {m.attention_dropout for m in model.modules() if hasattr(m, "attention_dropout")} == {0.0}
    assert model.config.attention_dropout == 0.3  # a saved model keeps its own dropout
