"""DPO and its kin on the user's own preference pairs: pairs -> reference log-probs (once) -> PreferenceTrainer ->
model.

:func:`train` reads top to bottom:

1. setup      the tokenizer and template (the model's saved one by default), the pairs tokenized into memory-mapped
              Arrow and cached (:func:`tunesmith.data.preference.prepare_pairs`: pairs whose chosen answer equals
              the rejected one are counted and dropped), the run directory opened (lock, fingerprint, resume).
2. reference  the starting model's summed answer log-probs of every pair (and eval pair), noise-free, scored once
              into Arrow shards in ``reference/`` (``reference-eval/``) and read beside the pairs: no reference model
              is held during training. Skipped for the reference-free losses (simpo, orpo). A killed run keeps the
              shards written.
3. train      :class:`tunesmith.preference.trainer.PreferenceTrainer` (full, LoRA or QLoRA; padded or padding-free
              pairs; NEFTune on the policy pass only), resumed from the newest complete checkpoint when asked.
4. save       the model (or adapter), tokenizer and template, the model card, and ``tunesmith.yaml`` last.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from tunesmith.config import build_config, parse_cli, save_yaml
from tunesmith.recipes.dpo.config import DPOConfig

log = logging.getLogger("tunesmith")


# ------------------------------------------------------------------------------------------------ 1. setup


def choose_template(cfg: DPOConfig, tokenizer, sources):
    """``template`` if set (``auto``: the chat template for conversational pairs when the tokenizer has one, else
    alpaca); unset, the template the model was saved with, else ``auto``."""
    from tunesmith.data.preference import is_conversational
    from tunesmith.data.templates import (
        TEMPLATE_FILE,
        load_saved_template,
        resolve_template,
    )

    if not cfg.data.template and (Path(cfg.model.model_name_or_path) / TEMPLATE_FILE).is_file():
        return load_saved_template(cfg.model.model_name_or_path, tokenizer)
    return resolve_template(cfg.data.template or "auto", tokenizer, is_conversational(sources[0].first_record))


def prepare_data(cfg: DPOConfig, tokenizer, template, sources) -> dict:
    """The training pairs (every source, mixed by ``mixture``) and the eval pairs (per source, by name), memory-mapped,
    with their summaries, logged by the main process."""
    from tunesmith.data.preference import prepare_pairs
    from tunesmith.data.source import open_sources

    data = cfg.data
    options = dict(dataset_format=data.dataset_format, num_proc=data.dataset_num_proc)
    train, summaries = prepare_pairs(sources, tokenizer, template, data.max_length, mixture=data.mixture,
                                     seed=cfg.training.seed, **options)
    out = {"train": train, "summaries": summaries, "eval": {}}
    if data.eval_dataset:
        for source in open_sources(data.eval_dataset, split="validation", key="eval_dataset"):
            # each held-out source on its own, with its num_samples (drawn as sft draws its eval sets)
            out["eval"][source.name], summary = prepare_pairs([source], tokenizer, template, data.max_length,
                                                              **options)
            out["summaries"] += summary
    if cfg.training.process_index == 0:
        for summary in out["summaries"]:
            for line in summary.lines():
                log.warning(line)
    return out


def fingerprint(cfg: DPOConfig, data: dict):
    """The config parts, the tokenized pairs (their cache keys) and the world size (it sets the global batch)."""
    from tunesmith.recipes.training import run_fingerprint

    return run_fingerprint(cfg, data=[s.fingerprint for s in data["summaries"]], world_size=cfg.training.world_size)


# ------------------------------------------------------------------------------------------------ 2. reference


def score_reference_stage(cfg: DPOConfig, run, model, data: dict, collator) -> dict:
    """Score (or reuse) the reference log-probs of the pairs and of every eval set; returns them beside the pairs:
    ``{"train": pairs, "eval": {name: pairs}}``."""
    from tunesmith.preference.pairs import score_reference, with_reference
    from tunesmith.rundir import barrier

    args = cfg.training
    folders = {name: "reference-eval" if len(data["eval"]) == 1 else f"reference-eval-{name}" for name in data["eval"]}
    sets = {"reference": data["train"], **{folders[name]: t for name, t in data["eval"].items()}}
    if run.stage("reference") is None:
        if args.process_index == 0:
            log.warning(f"dpo: scoring the reference log-probs of {sum(map(len, sets.values()))} pairs")
        start = time.perf_counter()
        for folder, pairs in sets.items():
            score_reference(model, pairs, run.stage_dir(folder), collator, shard_size=cfg.dpo.shard_size,
                            batch_size=args.per_device_eval_batch_size, device=args.device,
                            rank=args.process_index, world_size=args.world_size)
        barrier()  # every rank's shards are written
        scored = with_reference(data["train"], run.directory / "reference", cfg.dpo.shard_size)
        run.finish_stage("reference", {
            "pairs": len(scored), "seconds": time.perf_counter() - start,
            "ref_chosen": float(np.mean(scored.data.column("ref_chosen"))),
            "ref_rejected": float(np.mean(scored.data.column("ref_rejected")))})
    beside = {folder: with_reference(pairs, run.directory / folder, cfg.dpo.shard_size)
              for folder, pairs in sets.items()}
    return {"train": beside["reference"], "eval": {name: beside[folders[name]] for name in data["eval"]}}


# ------------------------------------------------------------------------------------------------ 4. save


def write_model_card(cfg: DPOConfig, out: Path, metrics: dict, template) -> None:
    """README.md as a Hugging Face model card (huggingface_hub's ModelCard): metadata, method, final metrics."""
    from huggingface_hub import ModelCard, ModelCardData

    from tunesmith.io import atomic_write_text

    method = "QLoRA" if cfg.model.load_in_4bit else "LoRA" if cfg.lora.use_peft else "full fine-tuning"
    alpha = cfg.neftune.neftune_noise_alpha
    neft = f"NEFTune alpha {alpha} on the policy pass" if alpha else "no NEFTune"
    local_base = Path(cfg.model.model_name_or_path).exists()
    card = ModelCardData(library_name="peft" if cfg.lora.use_peft else "transformers",
                         base_model=None if local_base else cfg.model.model_name_or_path,
                         tags=["tunesmith", "dpo", cfg.dpo.loss_type])
    lines = [f"# {out.name}", "", f"Preference-trained with tunesmith (`tunesmith dpo`, loss `{cfg.dpo.loss_type}`, "
             f"beta {cfg.dpo.beta}) from `{cfg.model.model_name_or_path}` on `{cfg.data.dataset}` ({method}, {neft}).",
             "", f"- prompt template: `{template.spec()}` (saved in tunesmith_template.json)",
             f"- epochs {cfg.training.num_train_epochs}, learning rate {cfg.training.learning_rate}, max length "
             f"{cfg.data.max_length}, seed {cfg.training.seed}", "", "## Final metrics", ""]
    lines += [f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in sorted(metrics.items())]
    atomic_write_text(out / "README.md", str(ModelCard(f"---\n{card.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")))


def save(cfg: DPOConfig, trainer, tokenizer, template, metrics: dict) -> None:
    """Model (adapter under LoRA), tokenizer, template, model card, then ``tunesmith.yaml`` (the finished mark)."""
    from tunesmith.models import gathered_state_dict, save_model_dir
    from tunesmith.rundir import barrier

    out = Path(cfg.training.output_dir)
    state = gathered_state_dict(trainer.model, trainer.accelerator)  # every rank takes part (FSDP / ZeRO-3)
    if trainer.is_world_process_zero():
        save_model_dir(trainer.model, tokenizer, out, template=template, state_dict=state)
        write_model_card(cfg, out, metrics, template)
        save_yaml(cfg, out / "tunesmith.yaml")  # written last: its presence marks a finished run
    barrier()


# ------------------------------------------------------------------------------------------------ the run


def train(config, callbacks: list | None = None) -> str:
    """Run DPO from a DPOConfig or a dict of its keys. Returns the output directory.

    ``resume_from_checkpoint``: true / last (the newest complete checkpoint in ``output_dir``) or a checkpoint
    directory; the reference log-probs of a run with the same settings are reused. ``callbacks``: extra
    ``transformers.TrainerCallback`` objects.
    """
    from tunesmith.recipes.training import check_max_length
    from tunesmith.rundir import open_run

    cfg = config if isinstance(config, DPOConfig) else build_config(DPOConfig, dict(config), "config")
    out = Path(cfg.training.output_dir)
    check_max_length(cfg)
    tokenizer, template, data = setup(cfg)
    main = cfg.training.process_index == 0
    with open_run(out, "dpo", fingerprint(cfg, data), cfg.training.resume_from_checkpoint, main=main) as run:
        if run.finished:
            log.warning(f"{out}: this run has finished already; nothing to resume")
            return str(out)
        trainer, stops, trained = build_trainer(cfg, run, tokenizer, data, callbacks)
        metrics = fit(trainer, stops, run, trained)
        save(cfg, trainer, tokenizer, template, metrics)
    return str(out)


def setup(cfg: DPOConfig):
    """The tokenizer, the template and the prepared pairs (nothing written in the run directory yet)."""
    from tunesmith.data.source import open_sources
    from tunesmith.models import check_weights, ensure_pad_token, load_tokenizer

    m = cfg.model
    tokenizer = load_tokenizer(m.model_name_or_path, m.trust_remote_code, m.model_revision, cfg.data.chat_template)
    check_weights(m.model_name_or_path)  # a torn model is a one-line error before the data is tokenized
    ensure_pad_token(tokenizer)
    sources = open_sources(cfg.data.dataset, split=cfg.data.dataset_split)
    template = choose_template(cfg, tokenizer, sources)
    return tokenizer, template, prepare_data(cfg, tokenizer, template, sources)


def build_trainer(cfg: DPOConfig, run, tokenizer, data: dict, callbacks=None):
    """The policy (or, when a killed run had finished training, its last checkpoint), the reference stage, and the
    PreferenceTrainer with its callbacks. Returns (trainer, its (divergence, polite) stops, whether training is
    already done)."""
    from transformers import set_seed

    from tunesmith.callbacks import JsonlMetrics, readable_logs, stop_callbacks
    from tunesmith.models import disable_dropout, resume_or_load
    from tunesmith.preference.config import loss_settings
    from tunesmith.preference.pairs import PairCollator
    from tunesmith.preference.trainer import PreferenceTrainer

    m = cfg.model
    set_seed(cfg.training.seed)
    collator = PairCollator(tokenizer.pad_token_id, cfg.data.max_length, cfg.data.padding_free)
    model, done = resume_or_load(cfg, run.checkpoint)
    if not done and cfg.dpo.disable_dropout:
        disable_dropout(model)
    sets = {"train": data["train"], "eval": data["eval"]}
    if loss_settings(cfg.dpo, cfg.dpo.beta).needs_reference:
        if run.stage("reference") is None and not m.load_in_4bit:
            model = model.to(cfg.training.device)
        sets = score_reference_stage(cfg, run, model, data, collator)
    evals = sets["eval"] if len(sets["eval"]) > 1 else next(iter(sets["eval"].values()), None)
    trainer = PreferenceTrainer(model=model, args=cfg.training, train_dataset=sets["train"],
                                eval_dataset=evals, data_collator=collator, processing_class=tokenizer,
                                neftune=cfg.neftune, loss=loss_settings(cfg.dpo, cfg.dpo.beta))
    readable_logs(trainer)  # numbers as numbers, rank 0 only
    stops = stop_callbacks("dpo")  # (divergence, polite)
    for callback in [JsonlMetrics(Path(cfg.training.output_dir) / "metrics.jsonl"), run.checkpoint_callback(),
                     *stops] + list(callbacks or []):
        trainer.add_callback(callback)
    return trainer, stops, done


def fit(trainer, stops, run, trained: bool) -> dict:
    """Train (resumed from ``run.checkpoint``) unless ``trained``; a diverged or stopped run raises before anything
    is saved. Returns the final evaluation's metrics (empty without eval pairs)."""
    divergence, polite = stops
    if not trained:
        with polite:  # its signal handlers are put back even when training fails
            trainer.train(resume_from_checkpoint=run.checkpoint)
        divergence.check()  # a diverged or stopped run writes no finished model
        polite.check()
    return final_evaluation(trainer)


def final_evaluation(trainer) -> dict:
    """Reward accuracy and margins of the trained model on the eval pairs. Under an eval_strategy the Trainer has
    just evaluated at the last step: those numbers are taken, not computed (and logged) a second time."""
    from tunesmith.callbacks import last_step_evaluation

    evals = trainer.eval_dataset
    if evals is None:
        return {}
    wanted = [f"eval_{name}_loss" for name in evals] if isinstance(evals, dict) else ["eval_loss"]
    logged = last_step_evaluation(trainer, wanted)
    return logged if logged is not None else trainer.evaluate()


def cli(argv: list[str]) -> int:
    cfg = parse_cli(DPOConfig, argv, "dpo", "Preference training on your own pairs (prompt/chosen/rejected, "
                    "conversations, UltraFeedback, Anthropic HH): DPO (sigmoid), hinge, IPO, DPO-Positive, SimPO or "
                    "ORPO; full, LoRA or QLoRA; reference log-probs scored once.")
    if cfg is None:
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = train(cfg)
    if cfg.training.process_index == 0:
        print(f"model saved to {out}")
    return 0

