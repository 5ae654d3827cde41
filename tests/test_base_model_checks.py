"""Issue 18.5 (and the wrong-shape case of 18.6): the base model is checked before training — missing or unexpected
weights, non-finite weights, a tokenizer larger than the model's vocabulary, a wrong tensor shape — each one line;
`predict` refuses a directory without a trained classification head."""
import shutil

import torch
from safetensors.torch import load_file, save_file

from conftest import build_model, build_tokenizer, fails


def sft_argv(model, data, out):
    return ["sft", "--model_name_or_path", str(model), "--dataset", data, "--output_dir", str(out), "--max_steps",
            "1", "--report_to", "none", "--use_cpu", "true", "--train_loss_eval_samples", "0", "--max_length", "128"]


def edited_model(tiny_model_dir, tmp_path, edit):
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    weights = load_file(str(d / "model.safetensors"))
    edit(weights)
    save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def test_a_missing_tensor_is_refused(tiny_model_dir, alpaca_file, tmp_path, capsys):
    d = edited_model(tiny_model_dir, tmp_path, lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    fails(capsys, sft_argv(d, alpaca_file, tmp_path / "out"),
          r"lacks 1 weight.*model\.layers\.1\.mlp\.up_proj\.weight", progress=True)
    assert not (tmp_path / "out" / "tunesmith.yaml").exists()


def test_an_unexpected_tensor_is_refused(tiny_model_dir, alpaca_file, tmp_path, capsys):
    d = edited_model(tiny_model_dir, tmp_path, lambda w: w.update({"model.layers.0.adapter.weight": torch.ones(3)}))
    fails(capsys, sft_argv(d, alpaca_file, tmp_path / "out"), r"1 weight.* not in the model.*adapter\.weight",
          progress=True)


def test_a_nan_weight_is_refused(tiny_model_dir, alpaca_file, tmp_path, capsys):
    def poison(w):
        w["model.layers.0.self_attn.q_proj.weight"][3, 5] = float("nan")

    d = edited_model(tiny_model_dir, tmp_path, poison)
    fails(capsys, sft_argv(d, alpaca_file, tmp_path / "out"),
          r"model\.layers\.0\.self_attn\.q_proj\.weight holds 1 non-finite", progress=True)
    fails(capsys, ["generate", "--model_name_or_path", str(d), "--prompts", alpaca_file, "--template", "alpaca",
                   "--output", str(tmp_path / "g.jsonl")], r"non-finite", progress=True)


def test_a_wrong_tensor_shape_is_one_line(tiny_model_dir, alpaca_file, tmp_path, capsys):
    def reshape(w):
        w["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 100)

    d = edited_model(tiny_model_dir, tmp_path, reshape)
    fails(capsys, sft_argv(d, alpaca_file, tmp_path / "out"), r"down_proj.*shape", progress=True)


def test_a_vocabulary_smaller_than_the_tokenizer_is_refused(alpaca_file, tmp_path, capsys, caplog):
    d = tmp_path / "small"
    tok = build_tokenizer(d)
    build_model(d, len(tok) - 300)
    fails(capsys, sft_argv(d, alpaca_file, tmp_path / "out"),
          rf"tokenizer has {len(tok)} tokens.*{len(tok) - 300} embedding rows", progress=True)


def test_the_intended_pad_token_resize_says_so(tiny_model_dir, alpaca_file, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO)
    from tunesmith.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(tiny_model_dir)
    notes = [r.getMessage() for r in caplog.records if "pad token" in r.getMessage()]
    assert len(notes) == 1 and f"{len(tok) - 1} to {len(tok)}" in notes[0], notes


def test_predict_refuses_a_directory_without_a_trained_head(tiny_model_dir, tmp_path, capsys):
    fails(capsys, ["predict", "--model_name_or_path", tiny_model_dir, "--text", "hello"],
          r"no trained classification head", progress=True)
