"""SPIN, self-play fine-tuning (Chen et al. 2024): every iteration in one resumable command.

Iteration t starts from theta_t (theta_0 = the SFT model); :meth:`Run.train` runs its stages in order:

1. generate   theta_t answers every SFT prompt, in batches, with exactly the training template (the prompt ids are
              ``encode_prompt``'s, the prefix of the training rows). Shards of ``shard_size`` prompts are written
              atomically to ``iteration-t/generations/``; under torchrun rank r takes shards r, r+world, ...
2. reference  log p_theta_t of the real and the generated answer of every training pair, noise-free, computed once
              and stored in ``iteration-t/reference/`` shards: no second model is held during training.
3. train      theta_{t+1} from theta_t on the pairs of iteration t (and t-1 with ``mix_previous_iteration``) with

                  t_i = beta * (log p(y|x)/p_t(y|x) - log p(y'|x)/p_t(y'|x))      (log p = sums over answer tokens)
                  sigmoid: log(1 + exp(-t_i))          hinge: max(0, 1 - t_i)

              in a Trainer subclass that scores real and generated rows in one forward (NEFTune noise on this
              policy pass only, when configured), projecting only answer positions onto the vocabulary. Trainer
              checkpoints in ``iteration-t/trainer`` allow a resume; under torchrun training is DDP.
4. save       ``iteration-t/model`` (renamed into place when complete). Under LoRA the adapter is merged first, so
              the next generator and reference is theta_{t+1} itself, never theta_0.

``spin_state.json`` (written atomically by rank 0 after every stage) records finished stages and their metrics, with
a fingerprint of the config; a rerun skips finished stages and shards, resumes training from the last complete
checkpoint, and refuses an output directory that holds a different run. ``summary.md`` / ``summary.json`` hold one
row per iteration.
"""
from __future__ import annotations

import gc
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from tunesmith.callbacks import JsonlMetrics, readable_logs, stop_callbacks
from tunesmith.config import build_config, parse_cli, save_yaml
from tunesmith.data.collate import Collator
from tunesmith.data.prepare import load_examples, prepare_dataset
from tunesmith.data.templates import get_template, load_saved_template
from tunesmith.errors import UserError
from tunesmith.io import atomic_write_json
from tunesmith.recipes.spin.config import SPINConfig, fingerprint_values
from tunesmith.recipes.spin.data import (PairCollator, build_prompts, generate_shards, generation_settings, pair_row,
                                         read_shards, shard_path)
from tunesmith.recipes.spin.loss import spin_loss
from tunesmith.recipes.spin.summary import write_summary
from tunesmith.recipes.spin.trainer import SPINTrainer, score_pairs
from tunesmith.recipes.training import check_max_length
from tunesmith.rundir import (Fingerprint, RunLock, check_checkpoint, checkpoint_callback, checkpoint_state, contents,
                              digest, newest_complete_checkpoint, training_done)
from tunesmith.scoring import rows_loss

log = logging.getLogger("tunesmith")

STATE_FILE = "spin_state.json"
STAGES = ("generate", "reference", "train")

def _barrier(cfg: SPINConfig) -> None:
    if cfg.training.world_size > 1:
        torch.distributed.barrier()


# ------------------------------------------------------------------------------------------------ the run


class Run:
    """One SPIN run: config, data and the state on disk. :meth:`train` runs or resumes every iteration."""

    def __init__(self, cfg: SPINConfig, callbacks=(), on_event=None):
        from tunesmith.models import check_weights, ensure_pad_token, load_tokenizer

        self.cfg, self.callbacks, self.on_event = cfg, list(callbacks), on_event
        self.out = Path(cfg.training.output_dir)
        m = cfg.model
        self.tokenizer = load_tokenizer(m.model_name_or_path, m.trust_remote_code, m.model_revision,
                                        cfg.data.chat_template)
        check_weights(m.model_name_or_path)  # a torn model is a one-line error before the data is read
        ensure_pad_token(self.tokenizer)
        if cfg.data.template:
            self.template = get_template(cfg.data.template, self.tokenizer)
        else:
            self.template = load_saved_template(cfg.model.model_name_or_path, self.tokenizer)
        examples = load_examples(cfg.data.dataset, cfg.data.dataset_format, cfg.data.dataset_split)
        self.prompts, dropped = build_prompts(examples, self.tokenizer, self.template, cfg.data.max_length,
                                              cfg.data.dataset)
        if dropped and cfg.training.process_index == 0:
            log.warning(f"spin: {len(dropped)} prompts leave no room for an answer in max_length={cfg.data.max_length} "
                        f"and are skipped (first: {dropped[0]})")
        self.eval_set = None
        if cfg.data.eval_dataset:
            data = cfg.data
            self.eval_set, _ = prepare_dataset(data.eval_dataset, self.tokenizer, self.template, data.max_length,
                                               dataset_format=data.dataset_format, split="validation",
                                               num_proc=data.dataset_num_proc)
        self.collator = PairCollator(self.tokenizer.pad_token_id)
        self.device = cfg.training.device
        # the prompts and real answers as tokens: a changed data file, tokenizer or template is a different run
        self.fingerprint = Fingerprint.of(fingerprint_values(cfg) | {
            "data_tokens": digest([[p.prompt_ids, p.real_ids] for p in self.prompts])})
        self.fp_values, self.fp = self.fingerprint.values, self.fingerprint.digest
        self.lock = None
        self.state = self._open_state(write=False)  # refuses another run's directory before anything is written

    def _lock(self) -> RunLock:
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"{self.out}: output_dir is a file, not a directory")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{self.out}: cannot create output_dir ({e.strerror or e})") from None
        return RunLock(self.out, "spin").acquire()

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # ---- state

    def _open_state(self, write: bool = True) -> dict:
        path = self.out / STATE_FILE
        if path.exists():
            try:
                state = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                raise UserError(f"{path}: malformed state file") from None
            if state.get("fingerprint") != self.fp:
                old = state.get("config", {})
                diff = sorted(k for k in set(old) | set(self.fp_values) if old.get(k) != self.fp_values.get(k))
                raise UserError(f"{self.out}: holds a different SPIN run (config differs in {', '.join(diff) or '?'}); "
                                "choose another output_dir")
            return state
        if self.out.exists() and contents(self.out):
            raise UserError(f"{self.out}: not empty and holds no SPIN run; choose an empty or new output_dir")
        state = {"fingerprint": self.fp, "config": self.fp_values, "prompts": len(self.prompts), "iterations": {}}
        if not write:
            return state
        _barrier(self.cfg)  # every rank has checked the directory before rank 0 writes into it
        if self.cfg.training.process_index == 0:
            atomic_write_json(path, state)
        return state

    def done(self, t: int, stage: str) -> dict | None:
        return self.state["iterations"].get(str(t), {}).get(stage)

    def mark(self, t: int, stage: str, metrics: dict) -> None:
        self.state["iterations"].setdefault(str(t), {})[stage] = metrics
        if self.cfg.training.process_index == 0:
            atomic_write_json(self.out / STATE_FILE, self.state)
            self.write_summary()
        _barrier(self.cfg)
        if self.on_event:
            self.on_event(stage + "_done", t, None)

    # ---- paths and model

    def iter_dir(self, t: int) -> Path:
        return self.out / f"iteration-{t}"

    def model_dir(self, t: int) -> str:
        """theta_t: the SFT model for t = 0, else the model saved by iteration t-1."""
        return self.cfg.model.model_name_or_path if t == 0 else str(self.iter_dir(t - 1) / "model")

    def load_model(self, t: int):
        from transformers import set_seed

        from tunesmith.models import load_model_and_tokenizer

        m = self.cfg.model
        set_seed(self.cfg.training.seed)  # a tokenizer without pad token gets a new embedding row: the same each load
        model, _ = load_model_and_tokenizer(self.model_dir(t), m.dtype, m.load_in_4bit, m.trust_remote_code,
                                            revision=None if t else m.model_revision,
                                            attn_implementation=m.attn_implementation)
        if not m.load_in_4bit:
            model = model.to(self.device)
        return model

    def sources(self, t: int) -> list[int]:
        """Iterations whose generated answers iteration t trains on."""
        return [t, t - 1] if self.cfg.spin.mix_previous_iteration and t > 0 else [t]

    def pairs(self, t: int, with_reference: bool) -> list[dict]:
        """The training pairs of iteration t, in a fixed order (source iteration, prompt index)."""
        cfg, n = self.cfg, len(self.prompts)
        n_gen = -(-n // cfg.spin.shard_size)
        out = []
        for s in self.sources(t):
            rows = [r for sh in read_shards(self.iter_dir(s) / "generations", n_gen) for r in sh["rows"]]
            for p, r in zip(self.prompts, rows):
                out.append({"real": pair_row(p.prompt_ids, p.real_ids, cfg.data.max_length),
                            "generated": pair_row(r["prompt_ids"], r["ids"], cfg.data.max_length)})
        if with_reference:
            refs = [r for sh in read_shards(self.iter_dir(t) / "reference", -(-len(out) // cfg.spin.shard_size))
                    for r in sh["rows"]]
            for pair, ref in zip(out, refs):
                pair["ref_real"], pair["ref_generated"] = ref["ref_real"], ref["ref_generated"]
        return out

    # ---- stages

    def stage_generate(self, t: int, model) -> dict:
        cfg = self.cfg
        directory = self.iter_dir(t) / "generations"
        directory.mkdir(parents=True, exist_ok=True)
        generate_shards(cfg, model, self.tokenizer, self.prompts, t, directory, self.on_event,
                        model_path=self.model_dir(t))
        _barrier(cfg)
        shards = read_shards(directory, -(-len(self.prompts) // cfg.spin.shard_size))
        rows = [r for sh in shards for r in sh["rows"]]
        if [r["index"] for r in rows] != list(range(len(self.prompts))):
            raise UserError(f"{directory}: shards do not hold each prompt exactly once (the run directory was "
                            "modified)")
        lengths = [len(r["ids"]) for r in rows]
        same = sum(r["ids"] == p.real_ids for r, p in zip(rows, self.prompts))
        return {"prompts": len(rows), "truncated": sum(r["truncated"] for r in rows), "identical": same / len(rows),
                "mean_generated_tokens": sum(lengths) / len(lengths), "seconds": sum(sh["seconds"] for sh in shards),
                "max_new_tokens": cfg.spin.max_new_tokens, "generation": cfg.spin.generation,
                **generation_settings(cfg, model, self.model_dir(t)), "seed": cfg.training.seed,
                "backend": cfg.spin.generation_backend}

    def stage_reference(self, t: int, model) -> dict:
        cfg = self.cfg
        directory = self.iter_dir(t) / "reference"
        directory.mkdir(parents=True, exist_ok=True)
        pairs = self.pairs(t, with_reference=False)
        n_shards = -(-len(pairs) // cfg.spin.shard_size)
        for k in range(cfg.training.process_index, n_shards, cfg.training.world_size):
            path = shard_path(directory, k)
            if path.exists():
                continue
            start = time.perf_counter()
            chunk = pairs[k * cfg.spin.shard_size:(k + 1) * cfg.spin.shard_size]
            real, gen = score_pairs(model, chunk, self.collator, cfg.training.per_device_eval_batch_size, self.device)
            rows = [{"ref_real": a, "ref_generated": b} for a, b in zip(real, gen)]
            atomic_write_json(path, {"shard": k, "seconds": time.perf_counter() - start, "rows": rows})
            if self.on_event:
                self.on_event("reference", t, k)
        _barrier(cfg)
        shards = read_shards(directory, n_shards)
        rows = [r for sh in shards for r in sh["rows"]]
        return {"pairs": len(rows), "ref_real": sum(r["ref_real"] for r in rows) / len(rows),
                "ref_generated": sum(r["ref_generated"] for r in rows) / len(rows),
                "seconds": sum(sh["seconds"] for sh in shards)}

    def stage_train(self, t: int, take_model) -> dict:
        """``take_model()`` hands over theta_t (the caller keeps no reference, so it can be freed after training)."""
        cfg = self.cfg
        it = self.iter_dir(t)
        pairs = self.pairs(t, with_reference=True)
        result_path = it / "train_result.json"
        if not (it / "model").exists():  # else: killed after the model was saved and before the state was written
            self.train_and_save(t, take_model(), pairs)
        gc.collect()  # the trainer, its optimizer and theta_t are gone before theta_{t+1} is loaded
        # end-of-iteration metrics: theta_{t+1} on the iteration's pairs, noise-free, against the stored reference
        model = self.load_model(t + 1)
        metrics = self.pair_metrics(model, pairs, cfg.spin.beta[t])
        if self.eval_set:
            metrics["eval_loss"] = self.eval_loss(model)
        result = json.loads(result_path.read_text()) if result_path.exists() else {}
        metrics.update({"loss": result.get("train_loss"), "steps": result.get("steps"),
                        "seconds": result.get("seconds"), "beta": cfg.spin.beta[t],
                        "learning_rate": cfg.spin.learning_rate[t], "num_train_epochs": cfg.spin.num_train_epochs[t],
                        "trained_on_iterations": self.sources(t)})
        return metrics

    def train_and_save(self, t: int, model, pairs: list[dict]) -> None:
        """Train theta_{t+1} from ``model`` (theta_t) on ``pairs``, resuming from the last complete checkpoint, and
        save it with :meth:`save_model`."""
        from transformers import set_seed

        from tunesmith.models import disable_dropout, gathered_state_dict, wrap_lora

        cfg, it = self.cfg, self.iter_dir(t)
        start = time.perf_counter()
        set_seed(cfg.training.seed)
        if cfg.lora.use_peft:
            model = wrap_lora(model, cfg.lora, quantized=cfg.model.load_in_4bit,
                              gradient_checkpointing=cfg.training.gradient_checkpointing)
        if cfg.spin.disable_dropout:  # the policy passes run without dropout, as in the authors' trainer
            disable_dropout(model)
        trainer = SPINTrainer(model=model, args=cfg.iteration_args(t, it / "trainer"), train_dataset=pairs,
                              data_collator=self.collator, processing_class=self.tokenizer,
                              neftune=cfg.neftune, beta=cfg.spin.beta[t], loss_type=cfg.spin.loss_type)
        readable_logs(trainer)  # numbers as numbers, rank 0 only
        trainer.add_callback(JsonlMetrics(it / "metrics.jsonl"))
        trainer.add_callback(checkpoint_callback(self.fingerprint))
        divergence, polite = stop_callbacks("spin")
        trainer.add_callback(divergence)
        trainer.add_callback(polite)
        for cb in self.callbacks:
            trainer.add_callback(cb)
        ckpt = newest_complete_checkpoint(it / "trainer")
        if ckpt is not None:
            check_checkpoint(ckpt, self.fingerprint)
        sharded = False
        if ckpt is not None and training_done(ckpt):  # killed after the last checkpoint: it is theta_{t+1}
            from tunesmith.models import load_model_and_tokenizer

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
            self.save_model(t, trained, state if sharded else None)
        _barrier(cfg)

    def pair_metrics(self, model, pairs: list[dict], beta: float) -> dict:
        cfg = self.cfg
        mine = pairs[cfg.training.process_index::cfg.training.world_size]
        real, gen = score_pairs(model, mine, self.collator, cfg.training.per_device_eval_batch_size, self.device)
        real, gen = torch.tensor(real, dtype=torch.float64), torch.tensor(gen, dtype=torch.float64)
        ref_r = torch.tensor([p["ref_real"] for p in mine], dtype=torch.float64)
        ref_g = torch.tensor([p["ref_generated"] for p in mine], dtype=torch.float64)
        losses, t = spin_loss(real, gen, ref_r, ref_g, beta, cfg.spin.loss_type)
        # a pair whose generated answer is token for token the real one has t = 0 and no gradient whatever the
        # weights: it counts as a miss in reward_accuracy, so the accuracy over the other pairs is reported too
        same = torch.tensor([p["real"]["input_ids"] == p["generated"]["input_ids"] for p in mine], dtype=torch.bool)
        sums = torch.stack([real.sum(), gen.sum(), ref_r.sum(), ref_g.sum(), t.sum(), (t > 0).double().sum(),
                            losses.sum(), torch.tensor(float(len(mine)), dtype=torch.float64),
                            same.double().sum()])
        if cfg.training.world_size > 1:
            sums = sums.to(self.device)
            torch.distributed.all_reduce(sums)
        s = sums.cpu().tolist()
        n, n_same = s[7], s[8]
        return {"policy_real": s[0] / n, "policy_generated": s[1] / n, "ref_real": s[2] / n,
                "ref_generated": s[3] / n, "reward_margin": s[4] / n, "reward_accuracy": s[5] / n,
                "identical_pairs": n_same / n,
                "reward_accuracy_distinct": s[5] / (n - n_same) if n > n_same else None,
                "final_pair_loss": s[6] / n}

    def eval_loss(self, model) -> float:
        cfg = self.cfg
        args = cfg.training
        return rows_loss(model, self.eval_set, Collator(self.tokenizer.pad_token_id), args.per_device_eval_batch_size,
                         self.device, args.process_index, args.world_size)["loss"]

    def save_model(self, t: int, model, state_dict: dict | None = None) -> None:
        """Save theta_{t+1} to iteration-t/model (LoRA merged first), renamed into place when complete.
        ``state_dict``: the whole model gathered from FSDP / ZeRO-3 shards (then a LoRA adapter is merged from disk:
        a sharded model cannot merge in memory)."""
        from tunesmith.models import load_model_and_tokenizer, save_model_dir

        cfg, it = self.cfg, self.iter_dir(t)
        if cfg.lora.use_peft and (cfg.model.load_in_4bit or state_dict is not None):  # merge into the base from disk
            adapter = it / "adapter"
            shutil.rmtree(adapter, ignore_errors=True)
            model.save_pretrained(adapter, safe_serialization=True, state_dict=state_dict)
            self.tokenizer.save_pretrained(adapter)
            model, _ = load_model_and_tokenizer(str(adapter), cfg.model.dtype)
            model = model.merge_and_unload()
        elif cfg.lora.use_peft:  # merged in memory: exactly the weights the reference pass of t+1 must see
            model = model.merge_and_unload()

        save_model_dir(model, self.tokenizer, it / "model", template=self.template,
                       write=lambda directory: save_yaml(cfg, directory / "tunesmith.yaml"),
                       state_dict=state_dict if not cfg.lora.use_peft else None)

    # ---- driver

    def train(self) -> str:
        """Run or resume every iteration, holding the output directory's lock (rank 0) throughout."""
        if self.cfg.training.process_index == 0:
            self.lock = self._lock()  # one run at a time in a directory
        try:
            self.state = self._open_state()  # again, under the lock: the directory may have changed since
            return self._train()
        finally:
            self.close()

    def _train(self) -> str:
        from tunesmith.progress import Stages

        cfg = self.cfg
        stages = Stages(cfg.spin.num_iterations * len(STAGES), speak=cfg.training.process_index == 0, say=log.info)
        what = {"generate": f"generate answers to {len(self.prompts)} prompts",
                "reference": "score real and generated answers (reference log-probs)",
                "train": "train on the pairs and save the model"}
        for t in range(cfg.spin.num_iterations):
            loaded = []  # theta_t, loaded once per iteration when a stage first needs it
            for stage in STAGES:
                label = f"SPIN iteration {t + 1} of {cfg.spin.num_iterations}: {what[stage]}"
                if self.done(t, stage):
                    stages.skip(label)
                    continue
                stages.start(label)
                if stage == "train":  # training takes theta_t over: no other reference to it stays alive
                    metrics = self.stage_train(t, lambda: loaded.pop() if loaded else self.load_model(t))
                    if cfg.training.process_index == 0:  # checkpoints are no longer needed once the model is saved
                        for checkpoint in (self.iter_dir(t) / "trainer").glob("checkpoint-*"):
                            shutil.rmtree(checkpoint, ignore_errors=True)
                else:
                    if stage == "generate" and cfg.spin.generation_backend == "vllm":
                        metrics = self.stage_generate(t, None)  # vLLM loads theta_t itself
                    else:
                        if not loaded:
                            loaded.append(self.load_model(t))
                        metrics = getattr(self, f"stage_{stage}")(t, loaded[0])
                self.mark(t, stage, metrics)
                stages.end()
                if cfg.training.process_index == 0:
                    log.info("  " + ", ".join(
                        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
        if cfg.training.process_index == 0:
            self.write_summary()
        _barrier(cfg)
        return str(self.iter_dir(cfg.spin.num_iterations - 1) / "model")

    def write_summary(self) -> None:
        write_summary(self.out, self.state, self.cfg.spin.num_iterations)


def train(config, callbacks=(), on_event=None) -> str:
    """Run (or resume) every SPIN iteration. ``config``: a SPINConfig or a dict of its keys. Returns the final model.

    ``callbacks`` are extra TrainerCallbacks; ``on_event(stage, iteration, shard)`` is called after every shard and
    stage written (both hooks exist for monitoring and for the crash tests).
    """
    cfg = config if isinstance(config, SPINConfig) else build_config(SPINConfig, dict(config), "config")
    check_max_length(cfg)
    return Run(cfg, callbacks, on_event).train()


def cli(argv: list[str]) -> int:
    cfg = parse_cli(SPINConfig, argv, "spin", "SPIN self-play fine-tuning: every iteration (generate, reference "
                    "log-probs, train, save) in one resumable run from an SFT model and its SFT data.")
    if cfg is None:
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    final = train(cfg)
    if cfg.training.process_index == 0:
        print((Path(cfg.training.output_dir) / "summary.md").read_text(encoding="utf-8"), end="")
        print(f"final model: {final}")
    return 0
