"""Supervised fine-tuning recipe: data -> masked tokens -> transformers.Trainer (full, LoRA or QLoRA) -> saved model.

Reads top to bottom in :func:`train`. The data is prepared as memory-mapped Arrow and cached
(:func:`tunesmith.data.prepare.prepare_dataset`). The loss is the causal-LM loss with lean logits
(:func:`tunesmith.scoring.causal_lm_loss`) normalised by the number of trained tokens across gradient accumulation
and processes (the Trainer's ``num_items_in_batch``). NEFTune noise, when
configured, is added in :meth:`TunesmithTrainer.compute_loss` for training passes only (see ``tunesmith.neftune``).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from tunesmith.callbacks import JsonlMetrics, stop_callbacks
from tunesmith.config import build_config, parse_cli, save_yaml
from tunesmith.data.collate import Collator, pack
from tunesmith.data.prepare import prepare_dataset
from tunesmith.data.templates import get_template
from tunesmith.errors import UserError
from tunesmith.recipes.sft.config import SFTConfig
from tunesmith.recipes.sft.trainer import TunesmithTrainer

log = logging.getLogger("tunesmith")


def prepare_data(cfg: SFTConfig, tokenizer):
    """Template, tokenized train/eval sets and their summaries; raises UserError before anything is written."""
    template = get_template(cfg.template, tokenizer)
    options = dict(dataset_format=cfg.dataset_format, train_on_prompt=cfg.train_on_prompt,
                   num_proc=cfg.dataset_num_proc)
    train_set, summary = prepare_dataset(cfg.dataset, tokenizer, template, cfg.max_length, split=cfg.dataset_split,
                                         **options)
    eval_set = eval_summary = None
    if cfg.eval_dataset:
        eval_set, eval_summary = prepare_dataset(cfg.eval_dataset, tokenizer, template, cfg.max_length,
                                                 split="validation", **options)
    return template, train_set, summary, eval_set, eval_summary


def build_model(cfg: SFTConfig, tokenizer):
    from tunesmith.models import load_model_and_tokenizer, model_options, wrap_lora

    model, _ = load_model_and_tokenizer(cfg.model_name_or_path, cfg.dtype, cfg.load_in_4bit, cfg.trust_remote_code,
                                        **model_options(cfg))
    if cfg.use_peft:
        model = wrap_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules,
                          quantized=cfg.load_in_4bit, gradient_checkpointing=cfg.gradient_checkpointing,
                          modules_to_save=cfg.modules_to_save)
    return model


def write_model_card(cfg: SFTConfig, out: Path, metrics: dict) -> None:
    """README.md as a Hugging Face model card (huggingface_hub's ModelCard): metadata header, method, final metrics."""
    from huggingface_hub import ModelCard, ModelCardData

    from tunesmith.io import atomic_write_text

    method = "QLoRA" if cfg.load_in_4bit else "LoRA" if cfg.use_peft else "full fine-tuning"
    neft = (f"NEFTune alpha {cfg.neftune_noise_alpha} ({cfg.neftune_noise_distribution}, per-example length)"
            if cfg.neftune_noise_alpha else "no NEFTune")
    local_base = Path(cfg.model_name_or_path).exists()  # the hub's base_model field takes hub ids only
    data = ModelCardData(library_name="peft" if cfg.use_peft else "transformers",
                         base_model=None if local_base else cfg.model_name_or_path,
                         tags=["tunesmith", "sft"] + (["neftune"] if cfg.neftune_noise_alpha else []))
    lines = [f"# {out.name}", "", f"Fine-tuned with tunesmith from `{cfg.model_name_or_path}` on `{cfg.dataset}` "
             f"({method}, {neft}).", "", f"- prompt template: `{cfg.template}` (saved in tunesmith_template.json)",
             f"- epochs {cfg.num_train_epochs}, learning rate {cfg.learning_rate}, max length {cfg.max_length}, "
             f"packing {cfg.packing}, seed {cfg.seed}", "", "## Final metrics", ""]
    lines += [f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in sorted(metrics.items())]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    atomic_write_text(out / "README.md", str(card))


def train(config, callbacks: list | None = None) -> str:
    """Run SFT from an SFTConfig or a dict of config keys. Returns the output directory.

    ``callbacks``: extra ``transformers.TrainerCallback`` objects (progress hooks, early stopping, ...).
    ``resume_from_checkpoint``: a checkpoint directory, or true / last for the newest complete one in ``output_dir``
    (written by this very run: its settings fingerprint must match). The output directory is locked while the run
    lives; a finished run is never overwritten (resuming it does nothing).
    """
    from transformers import set_seed

    from tunesmith.models import (check_weights, ensure_pad_token, gathered_state_dict, load_model_and_tokenizer,
                                  load_tokenizer, model_options, save_model_dir)
    from tunesmith.recipes.training import check_max_length, run_fingerprint
    from tunesmith.rundir import open_run, training_done

    cfg = config if isinstance(config, SFTConfig) else build_config(SFTConfig, dict(config), "config")
    out = Path(cfg.output_dir)
    with open_run(out, "sft", run_fingerprint(cfg), cfg.resume_from_checkpoint,
                  main=cfg.process_index == 0) as run:
        if run.finished:
            log.warning(f"{out}: this run has finished already; nothing to resume")
            return str(out)
        check_max_length(cfg)
        set_seed(cfg.seed)
        tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.trust_remote_code, cfg.model_revision,
                                   cfg.chat_template)
        check_weights(cfg.model_name_or_path)  # a torn model is a one-line error before the data is tokenized
        ensure_pad_token(tokenizer)
        template, train_set, summary, eval_set, eval_summary = prepare_data(cfg, tokenizer)
        if cfg.process_index == 0:
            for line in summary.lines() + (eval_summary.lines() if eval_summary else []):
                log.warning(line)
        rows = pack(train_set, cfg.max_length) if cfg.packing else train_set
        done = run.checkpoint is not None and training_done(run.checkpoint)
        if done:  # killed after its last checkpoint: that checkpoint IS the trained model (no step past max_steps)
            log.warning(f"{run.checkpoint}: training had reached max_steps; saving the model from it")
            model, _ = load_model_and_tokenizer(run.checkpoint, cfg.dtype, cfg.load_in_4bit, cfg.trust_remote_code,
                                               attn_implementation=cfg.attn_implementation)
        else:
            model = build_model(cfg, tokenizer)

        evals = {}
        if cfg.train_loss_eval_samples:
            g = torch.Generator().manual_seed(cfg.seed)
            idx = torch.randperm(summary.kept, generator=g)[: cfg.train_loss_eval_samples].tolist()
            evals["train"] = [train_set[i] for i in idx]  # scored one by one, even when training rows are packed
        if eval_set:
            evals["eval"] = eval_set
        trainer = TunesmithTrainer(
            model=model, args=cfg.training, train_dataset=rows, eval_dataset=evals or None,
            data_collator=Collator(tokenizer.pad_token_id, cfg.padding_free), processing_class=tokenizer,
            neftune_alpha=cfg.neftune_noise_alpha, neftune_distribution=cfg.neftune_noise_distribution)
        divergence, polite = stop_callbacks("sft")
        for callback in [JsonlMetrics(out / "metrics.jsonl"), run.checkpoint_callback(), divergence, polite] + \
                list(callbacks or []):
            trainer.add_callback(callback)
        if not done:
            with polite:  # its signal handlers are put back even when training fails
                trainer.train(resume_from_checkpoint=run.checkpoint)
            divergence.check()  # a diverged or stopped run writes no finished model
            polite.check()
        metrics = trainer.evaluate() if evals else {}

        state = gathered_state_dict(trainer.model, trainer.accelerator)  # every rank takes part (FSDP / ZeRO-3)
        if trainer.is_world_process_zero():
            save_model_dir(trainer.model, tokenizer, out, template=template, state_dict=state)
            write_model_card(cfg, out, metrics)
            save_yaml(cfg, out / "tunesmith.yaml")  # written last: its presence marks a finished run
        if cfg.world_size > 1:
            torch.distributed.barrier()
    return str(out)


def cli(argv: list[str]) -> int:
    cfg = parse_cli(SFTConfig, argv, "sft", "Supervised fine-tuning of a causal LM (full, LoRA or QLoRA), with "
                    "responses-only loss, optional packing and per-example NEFTune.")
    if cfg is None:
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = train(cfg)
    print(f"model saved to {out}")
    return 0
