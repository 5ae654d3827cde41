"""The classifier: a sequence-classification model with a fresh head, LoRA on it, and its Trainer."""
from __future__ import annotations

import dataclasses
import logging
from contextlib import nullcontext

import torch
import transformers
from transformers import Trainer

from tunesmith.errors import UserError, first_line
from tunesmith.models import (check_finite_weights, check_vocabulary, check_weights, ensure_pad_token, load_tokenizer,
                              resolve_dtype, wrap_lora)
from tunesmith.neftune import NEFTuneTrainerMixin

QUERY_PROJECTION_NAMES = ("query", "q_lin", "q_proj", "q")


def load_classifier(path: str, names: list[str] | None = None, multi_label: bool = False,
                    trust_remote_code: bool = False, dtype: str = "float32", revision: str | None = None,
                    attn_implementation: str | None = None):
    """(model, tokenizer, new_modules): a sequence classifier for ``names`` on top of the checkpoint at ``path``.

    ``new_modules`` are the modules the checkpoint did not provide (the fresh head): they must train fully.
    ``names=None`` keeps the checkpoint's own labels (for prediction)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    kwargs: dict = {"trust_remote_code": trust_remote_code, "revision": revision}
    if names is not None:
        kwargs.update(num_labels=len(names), id2label=dict(enumerate(names)),
                      label2id={n: i for i, n in enumerate(names)},
                      problem_type="multi_label_classification" if multi_label else "single_label_classification")
    try:
        config = transformers.AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: cannot load a model config ({first_line(e)})") from None
    remote = trust_remote_code and "AutoModelForSequenceClassification" in (getattr(config, "auto_map", None) or {})
    if type(config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING and not remote:
        raise UserError(f"{path}: model type '{config.model_type}' has no sequence-classification architecture "
                        f"in transformers (AutoModelForSequenceClassification cannot build it)")
    tokenizer = load_tokenizer(path, trust_remote_code, revision)
    ensure_pad_token(tokenizer, eos_pads=True)  # decoder-only models: EOS pads (the head reads the last real token)
    config.pad_token_id = tokenizer.pad_token_id
    check_weights(path)
    from tunesmith.quiet import logger_level

    # A head for new labels starts fresh on purpose: transformers' load report (a table of MISSING weights) would read
    # as a failure, so it is held back and the caller says what is new in plain words (from new_modules). Loading a
    # trained classifier (names None) keeps the report: a missing weight there is a real problem.
    quiet = logger_level("transformers.modeling_utils", logging.ERROR) if names is not None else nullcontext()
    try:  # safetensors only: a pickle (.bin) checkpoint can run code when loaded
        with quiet:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, config=config, dtype=resolve_dtype(dtype, getattr(config, "dtype", None)),
                trust_remote_code=trust_remote_code, revision=revision, ignore_mismatched_sizes=True,
                output_loading_info=True, use_safetensors=True,
                **({"attn_implementation": attn_implementation} if attn_implementation else {}))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot load the model ({first_line(e)})") from None
    missing = set(info.get("missing_keys") or ()) | {k[0] if isinstance(k, tuple) else k
                                                      for k in info.get("mismatched_keys") or ()}
    new_modules = sorted({k.rsplit(".", 1)[0] for k in missing if "." in k})
    check_finite_weights(model, path)
    check_vocabulary(model, tokenizer, path)
    return model, tokenizer, new_modules


def _lora_targets(model, wanted: list[str] | None) -> list[str]:
    linear_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if wanted and list(wanted) == ["all-linear"]:
        return list(wanted)  # peft picks every linear layer but the output head
    if wanted:
        unknown = [w for w in wanted if w not in linear_names and not any(
            n.endswith("." + w) or n == w for n, _ in model.named_modules())]
        if unknown:
            raise UserError(f"field 'lora_target_modules': no module named {', '.join(unknown)} in this model "
                            f"(linear layers: {', '.join(sorted(linear_names))})")
        return list(wanted)
    for name in QUERY_PROJECTION_NAMES:
        if name in linear_names:
            return [name]
    raise UserError(f"field 'lora_target_modules': no query projection found; name the modules "
                    f"(linear layers: {', '.join(sorted(linear_names))})")


def add_lora(model, lora, new_modules: list[str]):
    """LoRA (task SEQ_CLS) as the config's LoRA part says, on its modules or the query projection found in the model;
    the new head and ``modules_to_save`` train fully."""
    lora = dataclasses.replace(lora, lora_target_modules=_lora_targets(model, lora.lora_target_modules),
                               modules_to_save=sorted(set(new_modules) | set(lora.modules_to_save or ())))
    return wrap_lora(model, lora, task_type="SEQ_CLS")


class ClassifierTrainer(NEFTuneTrainerMixin, Trainer):
    """``Trainer`` whose training forward passes get NEFTune noise from :mod:`tunesmith.neftune` (per example, real
    tokens only). transformers' own NEFTune hook stays off: it scales by the padded batch length.

    The noise is added inside the forward (:meth:`noise`), so the model still receives ``input_ids``: a decoder-only
    head finds the last real token under right padding exactly as in evaluation (passing ``inputs_embeds`` instead
    would hide the padding from it, and it would pool a pad)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self.noise(model, inputs):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)


