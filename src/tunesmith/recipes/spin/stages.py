"""SPIN's stages of one iteration t, each a function of the :class:`~tunesmith.recipes.spin.run.SpinRun` and theta_t:

generate   theta_t answers every prompt (shards of ``shard_size`` prompts in ``iteration-t/generations/``)
reference  log p_theta_t of both answers of every training pair, noise-free (``iteration-t/reference/``)
train      theta_{t+1} from theta_t by the preference engine, resumable from its checkpoints, then saved
           (:func:`save_model`: LoRA merged first) and measured on the iteration's pairs

Each returns the metrics recorded for the stage in the run directory's state.
"""
from __future__ import annotations

import gc
import json
import logging
import time

import numpy as np
import torch

from tunesmith.config import save_yaml
from tunesmith.io import atomic_write_json
from tunesmith.preference.loss import PairLogps, preference_loss
from tunesmith.preference.pairs import n_shards, score_reference, shard_seconds
from tunesmith.recipes.spin.data import generate_shards, generation_metrics, generation_settings, read_generations

log = logging.getLogger("tunesmith")


# ------------------------------------------------------------------------------------------------ generate


def generate(run, t: int, model) -> dict:
    cfg = run.cfg
    directory = run.dirs.stage_dir(f"iteration-{t}/generate", f"iteration-{t}/generations")
    generate_shards(cfg, model, run.tokenizer, run.prompts, t, directory, run.on_event, model_path=run.model_dir(t))
    from tunesmith.rundir import barrier

    barrier()
    gens = read_generations(directory, len(run.prompts), cfg.spin.shard_size)
    spin = cfg.spin
    return {**generation_metrics(run.prompts, gens),
            "seconds": shard_seconds(directory, n_shards(len(gens), spin.shard_size)),
            "max_new_tokens": spin.max_new_tokens, "generation": spin.generation,
            **generation_settings(cfg, model, run.model_dir(t)), "seed": cfg.training.seed,
            "backend": spin.generation_backend}


# ------------------------------------------------------------------------------------------------ reference


def reference(run, t: int, model) -> dict:
    cfg = run.cfg
    directory = run.dirs.stage_dir(f"iteration-{t}/reference", f"iteration-{t}/reference")
    pairs = run.pairs(t, with_reference=False)
    score_reference(model, pairs, directory, run.collator, shard_size=cfg.spin.shard_size,
                    batch_size=cfg.training.per_device_eval_batch_size, device=run.device,
                    rank=cfg.training.process_index, world_size=cfg.training.world_size,
                    on_shard=(lambda k: run.on_event("reference", t, k)) if run.on_event else None)
    from tunesmith.rundir import barrier

    barrier()
    scored = run.pairs(t, with_reference=True)
    return {"pairs": len(scored), "ref_real": float(np.mean(scored.data.column("ref_chosen"))),
            "ref_generated": float(np.mean(scored.data.column("ref_rejected"))),
            "seconds": shard_seconds(directory, n_shards(len(scored), cfg.spin.shard_size))}


# ------------------------------------------------------------------------------------------------ train


def train(run, t: int, take_model) -> dict:
    """Train theta_{t+1} (``take_model()`` hands over theta_t for training: the caller keeps no reference to it, so
    it can be freed), save it, and measure it on the iteration's pairs, noise-free, against the stored reference."""
    cfg, it = run.cfg, run.iter_dir(t)
    pairs = run.pairs(t, with_reference=run.loss(t).needs_reference)
    if not (it / "model").exists():  # else: killed after the model was saved and before the state was written
        train_and_save(run, t, take_model(), pairs)
    gc.collect()  # the trainer, its optimizer and theta_t are gone before theta_{t+1} is loaded
    model = run.load_model(t + 1)
    metrics = pair_metrics(run, model, pairs, t)
    metrics.update(run.eval_losses(model))
    path = it / "train_result.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    spin = cfg.spin
    metrics.update({"loss": result.get("train_loss"), "steps": result.get("steps"), "seconds": result.get("seconds"),
                    "beta": spin.beta[t], "learning_rate": spin.learning_rate[t],
                    "num_train_epochs": spin.num_train_epochs[t], "trained_on_iterations": run.sources(t)})
    return metrics


def train_and_save(run, t: int, model, pairs) -> None:
    """Train theta_{t+1} from ``model`` (theta_t, ready to train) on ``pairs``, resuming from the newest complete
    checkpoint of the iteration, and save it with :func:`save_model`."""
    from transformers import set_seed

    from tunesmith.callbacks import JsonlMetrics, readable_logs, stop_callbacks
    from tunesmith.models import gathered_state_dict, load_model_and_tokenizer
    from tunesmith.preference.trainer import PreferenceTrainer
    from tunesmith.rundir import barrier, check_checkpoint, checkpoint_state, newest_complete_checkpoint, \
        training_done

    cfg, it = run.cfg, run.iter_dir(t)
    start = time.perf_counter()
    set_seed(cfg.training.seed)
    trainer = PreferenceTrainer(model=model, args=cfg.iteration_args(t, it / "trainer"), train_dataset=pairs,
                                data_collator=run.collator, processing_class=run.tokenizer, neftune=cfg.neftune,
                                loss=run.loss(t))
    readable_logs(trainer)  # numbers as numbers, rank 0 only
    divergence, polite = stop_callbacks("spin")
    for callback in [JsonlMetrics(it / "metrics.jsonl"), run.dirs.checkpoint_callback(), divergence, polite] + \
            run.callbacks:
        trainer.add_callback(callback)
    ckpt = newest_complete_checkpoint(it / "trainer")
    if ckpt is not None:
        check_checkpoint(ckpt, run.dirs.fingerprint)
    sharded = False
    if ckpt is not None and training_done(ckpt):  # killed after the last checkpoint: it is theta_{t+1}
        log.warning(f"spin: {ckpt}: training had reached its last step; saving the model from it")
        m = cfg.model
        trained, _ = load_model_and_tokenizer(str(ckpt), m.dtype, m.load_in_4bit, m.trust_remote_code)
        result = {"train_loss": None, "steps": checkpoint_state(ckpt)["global_step"]}
    else:
        with polite:  # its signal handlers are put back even when training fails
            output = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
        divergence.check()  # a diverged or stopped iteration saves no model
        polite.check()
        trained, result = trainer.model, {"train_loss": output.training_loss, "steps": output.global_step}
        sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    state = gathered_state_dict(trained, trainer.accelerator)  # every rank takes part (FSDP / ZeRO-3)
    if cfg.training.process_index == 0:
        atomic_write_json(it / "train_result.json", result | {"seconds": time.perf_counter() - start})
        save_model(run, t, trained, state if sharded else None)
    barrier()


@torch.no_grad()
def pair_metrics(run, model, pairs, t: int) -> dict:
    """theta_{t+1} on the iteration's pairs, noise-free: mean answer log-probs (real = chosen, generated =
    rejected), the reward margin and accuracy against the stored reference, and the loss. A pair whose generated
    answer is token for token the real one has margin 0 whatever the weights: it counts as a miss in
    ``reward_accuracy``, so the accuracy over the other pairs is reported too (``reward_accuracy_distinct``)."""
    from tunesmith.models import eval_mode
    from tunesmith.preference.pairs import pair_logps

    args = run.cfg.training
    settings = run.loss(t)
    mine = pairs.select(range(args.process_index, len(pairs), args.world_size))
    sums = torch.zeros(9, dtype=torch.float64)
    with eval_mode(model):
        for start in range(0, len(mine), args.per_device_eval_batch_size):
            cols = mine[start:start + args.per_device_eval_batch_size]
            rows = [dict(zip(cols, values)) for values in zip(*cols.values())]
            batch = {k: v.to(run.device) for k, v in run.collator(rows).items()}
            lp = pair_logps(model, batch)
            lp = PairLogps(lp.chosen.double(), lp.rejected.double(), lp.chosen_tokens, lp.rejected_tokens)
            losses, r_w, r_l = preference_loss(lp, batch.get("ref_chosen"), batch.get("ref_rejected"), settings)
            margin = (r_w - r_l).cpu()
            same = torch.tensor([float(r["chosen_ids"] == r["rejected_ids"]) for r in rows], dtype=torch.float64)
            ref_w = batch["ref_chosen"].cpu() if "ref_chosen" in batch else torch.zeros(len(rows), dtype=torch.float64)
            ref_l = batch["ref_rejected"].cpu() if "ref_rejected" in batch else torch.zeros_like(ref_w)
            sums += torch.stack([lp.chosen.sum().cpu(), lp.rejected.sum().cpu(), ref_w.sum(), ref_l.sum(),
                                 margin.sum() / settings.beta, (margin > 0).double().sum(), losses.sum().cpu(),
                                 torch.tensor(float(len(rows)), dtype=torch.float64), same.sum()])
    if args.world_size > 1:
        sums = sums.to(run.device)
        torch.distributed.all_reduce(sums)
    s = sums.cpu().tolist()
    n, n_same = s[7], s[8]
    reference = settings.needs_reference
    return {"policy_real": s[0] / n, "policy_generated": s[1] / n,
            "ref_real": s[2] / n if reference else None, "ref_generated": s[3] / n if reference else None,
            "reward_margin": settings.beta * s[4] / n, "reward_accuracy": s[5] / n, "identical_pairs": n_same / n,
            "reward_accuracy_distinct": s[5] / (n - n_same) if n > n_same else None, "final_pair_loss": s[6] / n}


# ------------------------------------------------------------------------------------------------ save


def save_model(run, t: int, model, state_dict: dict | None = None) -> None:
    """Save theta_{t+1} to iteration-t/model (LoRA merged first), renamed into place when complete.
    ``state_dict``: the whole model gathered from FSDP / ZeRO-3 shards (then a LoRA adapter is merged from disk:
    a sharded model cannot merge in memory)."""
    import shutil

    from tunesmith.models import load_model_and_tokenizer, save_model_dir

    cfg, it = run.cfg, run.iter_dir(t)
    peft = cfg.lora.use_peft
    if peft and (cfg.model.load_in_4bit or state_dict is not None):  # merge into the base read from disk
        adapter = it / "adapter"
        shutil.rmtree(adapter, ignore_errors=True)
        model.save_pretrained(adapter, safe_serialization=True, state_dict=state_dict)
        run.tokenizer.save_pretrained(adapter)
        model, _ = load_model_and_tokenizer(str(adapter), cfg.model.dtype)
        model = model.merge_and_unload()
    elif peft:  # merged in memory: exactly the weights the reference pass of t+1 must see
        model = model.merge_and_unload()
    save_model_dir(model, run.tokenizer, it / "model", template=run.template,
                   write=lambda directory: save_yaml(cfg, directory / "tunesmith.yaml"),
                   state_dict=state_dict if not peft else None)
