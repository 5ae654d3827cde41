"""The shared model / data keys every command gets: ``dtype: auto``, ``attn_implementation``, ``model_revision`` and
``chat_template``. The GPU side of ``dtype: auto`` is checked by making torch report a bf16 GPU (no GPU here)."""
import pytest
import torch

from conftest import sft_config
from tunesmith.config import build_config
from tunesmith.errors import UserError
from tunesmith.models import load_model_and_tokenizer, load_tokenizer, model_options, resolve_dtype


def sft_cfg(tiny_model_dir, data, out, **over):
    from tunesmith.recipes.sft import SFTConfig

    values = sft_config(tiny_model_dir, data, out, **over)
    return build_config(SFTConfig, values, "config")


def test_dtype_auto_is_float32_without_mixed_precision_on_cpu(tiny_model_dir, alpaca_file, tmp_path):
    values = sft_config(tiny_model_dir, alpaca_file, tmp_path)
    values.pop("use_cpu")
    from tunesmith.recipes.sft import SFTConfig

    cfg = build_config(SFTConfig, values, "config")
    assert cfg.model.dtype == "auto" and not cfg.training.bf16 and not cfg.training.fp16
    assert resolve_dtype("auto", "bfloat16") == torch.float32 and resolve_dtype("auto", None) == torch.float32
    model, _ = load_model_and_tokenizer(tiny_model_dir, "auto")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_dtype_auto_on_a_bf16_gpu(tiny_model_dir, alpaca_file, tmp_path, monkeypatch):
    from tunesmith.config import device_mixed_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "bfloat16") == torch.bfloat16
    assert resolve_dtype("auto", torch.float16) == torch.bfloat16  # fp16 checkpoints train as bf16, not fp16
    assert resolve_dtype("auto", "float32") == torch.float32
    parts = {"model": {}, "training": {}}
    device_mixed_precision(parts)
    assert parts["training"] == {"bf16": True}
    for explicit in ({"model": {"dtype": "float32"}, "training": {}}, {"model": {}, "training": {"bf16": False}},
                     {"model": {}, "training": {"use_cpu": True}}):
        device_mixed_precision(explicit)
        assert "bf16" not in explicit["training"] or explicit["training"]["bf16"] is False  # the config's own wins
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", "float16") == torch.float32  # an fp16-only GPU: float32 master weights ...
    parts = {"model": {"dtype": "auto"}, "training": {}}
    device_mixed_precision(parts)
    assert parts["training"] == {"fp16": True}  # ... with fp16 autocast


def test_attn_implementation_reaches_the_model(tiny_model_dir, alpaca_file, tmp_path):
    cfg = sft_cfg(tiny_model_dir, alpaca_file, tmp_path, attn_implementation="eager")
    assert cfg.model.attn_implementation == "eager"
    model, _ = load_model_and_tokenizer(tiny_model_dir, "float32", **model_options(cfg))
    assert model.config._attn_implementation == "eager"
    default = sft_cfg(tiny_model_dir, alpaca_file, tmp_path)
    assert default.model.attn_implementation == "sdpa"
    model, _ = load_model_and_tokenizer(tiny_model_dir, "float32", **model_options(default))
    assert model.config._attn_implementation == "sdpa"


def test_attn_implementation_errors_are_one_line(tiny_model_dir, alpaca_file, tmp_path):
    with pytest.raises(UserError, match="flash_attention_2 is not available here"):  # flash-attn is not installed
        sft_cfg(tiny_model_dir, alpaca_file, tmp_path, attn_implementation="flash_attention_2")
    with pytest.raises(UserError, match="must be one of"):
        sft_cfg(tiny_model_dir, alpaca_file, tmp_path, attn_implementation="flash")


def test_model_revision_is_a_shared_key(tiny_model_dir, alpaca_file, tmp_path):
    cfg = sft_cfg(tiny_model_dir, alpaca_file, tmp_path, model_revision="v1.0")
    assert model_options(cfg)["revision"] == "v1.0"
    from tunesmith.recipes.classify import ClassifyConfig
    from tunesmith.recipes.spin import SPINConfig

    for cls in (SPINConfig, ClassifyConfig):
        assert {"model_revision", "attn_implementation", "dtype"} <= set(cls.owners())
    assert "chat_template" in SPINConfig.owners()


def test_chat_template_file(tiny_model_dir, alpaca_file, tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}{% if m['role'] == 'assistant' "
                        "%}{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<<assistant>> "
                        "{% endif %}")
    cfg = sft_cfg(tiny_model_dir, alpaca_file, tmp_path, template="chat", chat_template=str(template))
    tok = load_tokenizer(tiny_model_dir, chat_template=cfg.data.chat_template)
    assert tok.chat_template == template.read_text()
    from tunesmith.recipes.sft import prepare_data

    _, train_set, _, _, _ = prepare_data(cfg, tok)
    assert tok.decode(train_set[0]["input_ids"]).startswith("<<user>> ")
    with pytest.raises(UserError, match="field 'chat_template'"):
        sft_cfg(tiny_model_dir, alpaca_file, tmp_path, chat_template=str(tmp_path / "missing.jinja"))
    (tmp_path / "plain.txt").write_text("not a template")
    with pytest.raises(UserError, match="not a Jinja template"):
        sft_cfg(tiny_model_dir, alpaca_file, tmp_path, chat_template=str(tmp_path / "plain.txt"))
