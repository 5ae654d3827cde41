"""Labelling texts with a trained classifier, the classification metrics, and `tunesmith predict`."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tunesmith.config import build_config, field, parse_cli
from tunesmith.errors import UserError
from tunesmith.io import atomic_write_jsonl, resolve_path
from tunesmith.models import eval_mode
from tunesmith.recipes.classify.data import label_id, load_split, raw_labels, text_of
from tunesmith.recipes.classify.trainer import load_classifier


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


@torch.no_grad()
def predict_texts(model, tokenizer, texts: list[str], batch_size: int = 32, max_length: int = 256,
                  threshold: float = 0.5) -> tuple[list[dict], np.ndarray]:
    """Label ``texts``: ([{"label", "score", "scores"}...] or multi-label [{"labels", "scores"}...], raw logits)."""
    config = model.config
    id2label = {int(k): v for k, v in config.id2label.items()}
    multi = config.problem_type == "multi_label_classification"
    device = next(model.parameters()).device
    rows, all_logits = [], []
    with eval_mode(model):
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
    logits = np.concatenate(all_logits) if all_logits else np.zeros((0, len(id2label)))
    return rows, logits


def shown_label(row: dict) -> str:
    return ", ".join(row["labels"]) or "(none)" if "labels" in row else row["label"]


@dataclass
class PredictConfig:
    model_name_or_path: str = field("", "a trained classifier directory (or pkg:PACKAGE/path, hub id)")
    text: str | list[str] | None = field(None, "a sentence, or a YAML list of sentences, to label")
    dataset: str | None = field(None, "a data file to label (.json/.jsonl/.csv/.parquet)")
    text_column: str = field("text", "column holding the text in --dataset")
    label_column: str = field("label", "if --dataset has this column, accuracy and F1 against it are printed")
    output: str | None = field(None, "write predictions as JSONL here")
    batch_size: int = field(32, "texts per forward pass")
    max_length: int = field(256, "truncate texts to this many tokens")
    threshold: float = field(0.5, "multi-label: a label is predicted when its probability >= threshold")
    trust_remote_code: bool = field(False, "allow model code from the model directory")
    overwrite: bool = field(False, "replace an existing output file that this command did not write (never an input)")

    def __post_init__(self):
        if not self.model_name_or_path:
            raise UserError("field 'model_name_or_path' is required")
        if self.text is None and self.dataset is None:
            raise UserError("give --text SENTENCE or --dataset DATA to label")
        if isinstance(self.text, str):
            self.text = [self.text]
        from tunesmith import checks

        checks.at_least("batch_size", self.batch_size, 1)
        checks.at_least("max_length", self.max_length, 2)
        checks.number("threshold", self.threshold, low=0, high=1, low_open=True, high_open=True)
        if self.output:
            from tunesmith.rundir import check_output_file

            check_output_file(self.output, "output", command="predict", overwrite=self.overwrite,
                              inputs={"dataset": self.dataset, "model_name_or_path": self.model_name_or_path})


def predict(cfg: PredictConfig | dict) -> list[dict]:
    """Label the texts of ``cfg`` with a trained classifier; returns one row per text."""
    cfg = cfg if isinstance(cfg, PredictConfig) else build_config(PredictConfig, dict(cfg), "config")
    model, tokenizer, untrained = load_classifier(resolve_path(cfg.model_name_or_path),
                                                  trust_remote_code=cfg.trust_remote_code)
    if untrained:  # a causal LM's run, a bare encoder: the head would be new random weights
        raise UserError(f"{cfg.model_name_or_path}: no trained classification head (the checkpoint lacks "
                        f"{', '.join(untrained[:3])}); give a directory `tunesmith classify` wrote")
    texts = list(cfg.text or [])
    records = load_split(cfg.dataset, "test") if cfg.dataset else []
    texts += [text_of(r, cfg.text_column) for r in records]
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
            ids = [label_id(v, names, r.loc, cfg.label_column) for v in raw_labels(r, cfg.label_column, multi)]
            targets.append([1.0 if i in ids else 0.0 for i in range(len(names))] if multi else ids[0])
        m = classification_metrics(logits[len(texts) - len(records):], np.asarray(targets), names, multi,
                                   cfg.threshold)
        print(f"{cfg.dataset}: accuracy {m['accuracy']:.4f}, macro F1 {m['f1_macro']:.4f} on {len(records)} texts")
    if cfg.output:
        atomic_write_jsonl(cfg.output, rows, command="predict")
    return rows


def cli(argv: list[str]) -> int:
    cfg = parse_cli(PredictConfig, argv, "predict", "Label sentences or a data file with a trained classifier.")
    if cfg is None:
        return 0
    predict(cfg)
    return 0
