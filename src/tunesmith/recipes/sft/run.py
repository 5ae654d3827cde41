"""Supervised fine-tuning recipe: data -> masked tokens -> transformers.Trainer (full, LoRA or QLoRA) -> saved model.

Reads top to bottom in :func:`train`. The data comes through the one data entry (:mod:`tunesmith.data.source`):
every source is tokenized into memory-mapped Arrow and cached, and several training sources are mixed. The loss is
the causal-LM loss with lean logits (:func:`tunesmith.scoring.causal_lm_loss`) normalised by the number of trained
tokens across gradient accumulation and processes (the Trainer's ``num_items_in_batch``). NEFTune noise, when
configured, is added in :meth:`TunesmithTrainer.compute_loss` for training passes only (see ``tunesmith.neftune``).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from tunesmith.callbacks import JsonlMetrics, last_step_evaluation, readable_logs, stop_callbacks
from tunesmith.config import build_config, parse_cli, save_yaml
from tunesmith.data.collate import Collator, pack
from tunesmith.data.source import data_identity, describe, open_sources, template_for, tokenize_sources
from tunesmith.recipes.sft.config import SFTConfig
from tunesmith.recipes.sft.trainer import TunesmithTrainer

log = logging.getLogger("tunesmith")


def training_tokenizer(cfg: SFTConfig):
    """The tokenizer SFT trains with — the model's at ``model_revision``, with ``chat_template`` when given, and the
    pad-token rule — so that ``tunesmith audit`` shows exactly the text training sees."""
    from tunesmith.models import ensure_pad_token, load_tokenizer

    model = cfg.model
    tokenizer = load_tokenizer(model.model_name_or_path, model.trust_remote_code, model.model_revision,
                               cfg.data.chat_template)
    ensure_pad_token(tokenizer)
    return tokenizer


def training_sources(cfg: SFTConfig):
    """The ``dataset`` sources, resolved once (:func:`tunesmith.data.source.open_sources`)."""
    return open_sources(cfg.data.dataset, split=cfg.data.dataset_split, dataset_format=cfg.data.dataset_format)


def prepare_data(cfg: SFTConfig, tokenizer, train_sources=None):
    """Template, the training rows (the mixture of the ``dataset`` sources; ``train_sources`` when already opened),
    the held-out sets by name and their summaries; raises UserError before anything is written. One held-out source
    is named ``eval`` (metrics ``eval_eval_loss``), several by their source names (``eval_<name>_loss``)."""
    data = cfg.data
    train_sources = train_sources or training_sources(cfg)
    eval_sources = open_sources(data.eval_dataset, split="validation", dataset_format=data.dataset_format,
                                key="eval_dataset") if data.eval_dataset else []
    template = template_for(data.template, tokenizer, train_sources)
    options = dict(train_on_prompt=data.train_on_prompt, num_proc=data.dataset_num_proc)
    train_set, summary = tokenize_sources(train_sources, tokenizer, template, data.max_length, mixture=data.mixture,
                                          seed=cfg.training.seed, **options)
    eval_sets, eval_summaries = {}, []
    for source in eval_sources:
        rows, s = tokenize_sources([source], tokenizer, template, data.max_length, **options)
        name = "eval" if len(eval_sources) == 1 else source.name
        eval_sets["eval-" + name if name == "train" else name] = rows
        eval_summaries.append(s)
    return template, train_set, summary, eval_sets, eval_summaries


def write_model_card(cfg: SFTConfig, out: Path, metrics: dict, template) -> None:
    """README.md as a Hugging Face model card (huggingface_hub's ModelCard): metadata header, method, final metrics."""
    from huggingface_hub import ModelCard, ModelCardData

    from tunesmith.io import atomic_write_text

    base, neftune, args = cfg.model.model_name_or_path, cfg.neftune, cfg.training
    method = "QLoRA" if cfg.model.load_in_4bit else "LoRA" if cfg.lora.use_peft else "full fine-tuning"
    neft = (f"NEFTune alpha {neftune.neftune_noise_alpha} ({neftune.neftune_noise_distribution}, per-example length)"
            if neftune.neftune_noise_alpha else "no NEFTune")
    local_base = Path(base).exists()  # the hub's base_model field takes hub ids only
    data = ModelCardData(library_name="peft" if cfg.lora.use_peft else "transformers",
                         base_model=None if local_base else base,
                         tags=["tunesmith", "sft"] + (["neftune"] if neftune.neftune_noise_alpha else []))
    lines = [f"# {out.name}", "", f"Fine-tuned with tunesmith from `{base}` on "
             f"`{describe(cfg.data.dataset)}` "
             f"({method}, {neft}).", "", f"- prompt template: `{template.spec()}` (saved in tunesmith_template.json)",
             f"- epochs {args.num_train_epochs}, learning rate {args.learning_rate}, max length {cfg.data.max_length}, "
             f"packing {cfg.data.packing}, seed {args.seed}", "", "## Final metrics", ""]
    lines += [f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in sorted(metrics.items())]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    atomic_write_text(out / "README.md", str(card))


def train_loss_sample(n_examples: int, n_wanted: int, seed: int) -> list[int]:
    """Indices of the training examples scored noise-free at every evaluation: ``n_wanted`` drawn with ``seed``, never
    more than there are (the whole set, in a fixed order, when it has fewer)."""
    n = min(n_wanted, n_examples)
    return torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed))[:n].tolist()


def final_metrics(trainer, evals: dict) -> dict:
    """The noise-free losses of the trained model. Under an eval_strategy the Trainer has just evaluated at the last
    step: those numbers are taken, not computed a second time. Otherwise the evaluation runs now, announced with
    its size and duration (it used to be silent minutes after the training bar reached 100%)."""
    if not evals:
        return {}
    logged = last_step_evaluation(trainer, [f"eval_{name}_loss" for name in evals])
    if logged is not None:
        return logged
    from tunesmith.progress import duration

    speak = trainer.is_world_process_zero()
    sizes = ", ".join(f"{len(rows)} training examples" if name == "train" else
                      f"{len(rows)} held-out examples" + (f" ({name})" if name != "eval" else "")
                      for name, rows in evals.items())
    if speak:
        log.info(f"final noise-free evaluation: {sizes}")
    start = time.perf_counter()
    metrics = trainer.evaluate()
    if speak:
        log.info(f"final noise-free evaluation: done in {duration(time.perf_counter() - start)}")
    return metrics


def train(config, callbacks: list | None = None) -> str:
    """Run SFT from an SFTConfig or a dict of config keys. Returns the output directory.

    ``callbacks``: extra ``transformers.TrainerCallback`` objects (progress hooks, early stopping, ...).
    ``resume_from_checkpoint``: a checkpoint directory, or true / last for the newest complete one in ``output_dir``
    (written by this very run: its settings fingerprint must match). The output directory is locked while the run
    lives; a finished run is never overwritten (resuming it does nothing).
    """
    from transformers import set_seed

    from tunesmith.models import check_weights, gathered_state_dict, resume_or_load, save_model_dir
    from tunesmith.recipes.training import check_max_length, run_fingerprint
    from tunesmith.rundir import open_run

    cfg = config if isinstance(config, SFTConfig) else build_config(SFTConfig, dict(config), "config")
    args = cfg.training
    out = Path(args.output_dir)
    sources = training_sources(cfg)  # the data's digest is in the fingerprint: a resume on changed data is refused
    fingerprint = run_fingerprint(cfg, data=data_identity(sources))
    with open_run(out, "sft", fingerprint, args.resume_from_checkpoint, main=args.process_index == 0) as run:
        if run.finished:
            log.warning(f"{out}: this run has finished already; nothing to resume")
            return str(out)
        check_max_length(cfg)
        set_seed(cfg.training.seed)
        tokenizer = training_tokenizer(cfg)
        check_weights(cfg.model.model_name_or_path)  # a torn model is a one-line error before the data is tokenized
        template, train_set, summary, eval_sets, eval_summaries = prepare_data(cfg, tokenizer, sources)
        if args.process_index == 0:
            for line in summary.lines() + [line for s in eval_summaries for line in s.lines()]:
                log.warning(line)
        rows = pack(train_set, cfg.data.max_length) if cfg.data.packing else train_set
        model, done = resume_or_load(cfg, run.checkpoint)

        evals = {}
        if cfg.sft.train_loss_eval_samples:
            idx = train_loss_sample(len(train_set), cfg.sft.train_loss_eval_samples, args.seed)
            evals["train"] = [train_set[i] for i in idx]  # scored one by one, even when training rows are packed
        evals.update(eval_sets)
        trainer = TunesmithTrainer(
            model=model, args=args, train_dataset=rows, eval_dataset=evals or None,
            data_collator=Collator(tokenizer.pad_token_id, cfg.data.padding_free), processing_class=tokenizer,
            neftune=cfg.neftune)
        readable_logs(trainer)  # numbers as numbers, rank 0 only
        divergence, polite = stop_callbacks("sft")
        for callback in [JsonlMetrics(out / "metrics.jsonl"), run.checkpoint_callback(), divergence, polite] + \
                list(callbacks or []):
            trainer.add_callback(callback)
        if not done:
            with polite:  # its signal handlers are put back even when training fails
                trainer.train(resume_from_checkpoint=run.checkpoint)
            divergence.check()  # a diverged or stopped run writes no finished model
            polite.check()
        metrics = final_metrics(trainer, evals)

        state = gathered_state_dict(trainer.model, trainer.accelerator)  # every rank takes part (FSDP / ZeRO-3)
        if trainer.is_world_process_zero():
            save_model_dir(trainer.model, tokenizer, out, template=template, state_dict=state)
            write_model_card(cfg, out, metrics, template)
            save_yaml(cfg, out / "tunesmith.yaml")  # written last: its presence marks a finished run
        if args.world_size > 1:
            torch.distributed.barrier()
    return str(out)


def cli(argv: list[str]) -> int:
    cfg = parse_cli(SFTConfig, argv, "sft", "Supervised fine-tuning of a causal LM (full, LoRA or QLoRA), with "
                    "responses-only loss, optional packing and per-example NEFTune.")
    if cfg is None:
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = train(cfg)
    if cfg.training.process_index == 0:  # rank 0 speaks for the run
        print(f"model saved to {out}")
    return 0
