"""SPIN, self-play fine-tuning (Chen et al. 2024): every iteration in one resumable command — "generate the pairs,
then preference-train" on the shared preference engine (:mod:`tunesmith.preference`).

Iteration t starts from theta_t (theta_0 = the SFT model, or a LoRA SFT output: its base with the adapter);
:meth:`SpinRun.train` runs its stages (:mod:`.stages`) in order:

1. generate   theta_t answers every SFT prompt, in batches, with exactly the training template (the prompt ids are
              the prefix of the training rows). Shards of ``shard_size`` prompts are written atomically as Arrow to
              ``iteration-t/generations/``; under torchrun rank r takes shards r, r+world, ...
2. reference  log p_theta_t of the real and the generated answer of every training pair, noise-free, computed once
              and stored in ``iteration-t/reference/`` shards: no second model is held during training.
3. train      theta_{t+1} from theta_t on the pairs of iteration t (and t-1 with ``mix_previous_iteration``): chosen =
              the real answer, rejected = the generated one, the loss ``loss_type`` (the paper's sigmoid, or hinge,
              ipo, dpop, simpo, orpo), with the paper's lambda as ``beta``:

                  t_i = beta * (log p(y|x)/p_t(y|x) - log p(y'|x)/p_t(y'|x))      (log p = sums over answer tokens)
                  sigmoid: log(1 + exp(-t_i))          hinge: max(0, 1 - t_i)

              Trainer checkpoints in ``iteration-t/trainer`` allow a resume; under torchrun training is DDP.
4. save       ``iteration-t/model`` (renamed into place when complete). Under LoRA the adapter is merged first, so
              the next generator and reference is theta_{t+1} itself, never theta_0.

The prompts, generated answers and pairs live in memory-mapped Arrow tables (:mod:`.data`). The run directory goes
through :func:`tunesmith.rundir.open_run` (one lock, the fingerprint of the config parts and the tokenized prompts,
finished stages recorded with their metrics): a rerun skips finished stages and shards, resumes training from the
newest complete checkpoint, and refuses an output directory that holds a different run. ``summary.md`` /
``summary.json`` hold one row per iteration; ``tunesmith.yaml`` at the top marks the finished run.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from tunesmith.config import build_config, parse_cli, save_yaml
from tunesmith.errors import UserError
from tunesmith.recipes.spin import stages
from tunesmith.recipes.spin.config import SPINConfig
from tunesmith.recipes.spin.summary import write_summary

log = logging.getLogger("tunesmith")

STAGES = ("generate", "reference", "train")


class SpinRun:
    """One SPIN run: its setup (tokenizer, template, prompt table, fingerprint; nothing written), its stages, and the
    run directory. :meth:`train` runs or resumes every iteration."""

    def __init__(self, cfg: SPINConfig, callbacks=(), on_event=None):
        from tunesmith.data.source import open_sources, template_for, tokenize_sources
        from tunesmith.data.templates import load_saved_template
        from tunesmith.models import check_weights, ensure_pad_token, is_adapter_dir, load_tokenizer
        from tunesmith.preference.pairs import PairCollator
        from tunesmith.recipes.spin.data import prepare_prompts
        from tunesmith.recipes.training import run_fingerprint

        self.cfg, self.callbacks, self.on_event = cfg, list(callbacks), on_event
        m, data, args = cfg.model, cfg.data, cfg.training
        self.out, self.device = Path(args.output_dir), args.device
        if is_adapter_dir(m.model_name_or_path) and cfg.spin.generation_backend == "vllm":
            raise UserError(f"{m.model_name_or_path}: a LoRA adapter; generation_backend vllm needs a whole model "
                            "(tunesmith merge --adapter ... --output ..., then start from the merged model)")
        self.tokenizer = load_tokenizer(m.model_name_or_path, m.trust_remote_code, m.model_revision,
                                        data.chat_template)
        check_weights(m.model_name_or_path)  # a torn model is a one-line error before the data is read
        ensure_pad_token(self.tokenizer)
        sources = open_sources(data.dataset, split=data.dataset_split, dataset_format=data.dataset_format)
        self.template = (template_for(data.template, self.tokenizer, sources) if data.template
                         else load_saved_template(m.model_name_or_path, self.tokenizer))
        self.prompts, dropped, first, prompts_keys = prepare_prompts(
            sources, self.tokenizer, self.template, data.max_length, mixture=data.mixture, seed=args.seed,
            num_proc=data.dataset_num_proc)
        if dropped and args.process_index == 0:
            log.warning(f"spin: {dropped} prompts leave no room for an answer in max_length={data.max_length} and are "
                        f"skipped (first: {first[0]})")
        self.eval_sets = {}  # held-out sources by name: noise-free loss at the end of every iteration
        for source in open_sources(data.eval_dataset, split="validation", dataset_format=data.dataset_format,
                                   key="eval_dataset") if data.eval_dataset else []:
            # each held-out source with its own template and num_samples (drawn as sft draws its eval sets)
            self.eval_sets[source.name], _ = tokenize_sources([source], self.tokenizer, self.template,
                                                              data.max_length, num_proc=data.dataset_num_proc)
        self.collator = PairCollator(self.tokenizer.pad_token_id, data.max_length, data.padding_free)
        # the config parts, the tokenized prompts and real answers (a changed data file, tokenizer or template is a
        # different run) and the world size (it sets the global batch and which rank writes which shard)
        self.fingerprint = run_fingerprint(cfg, ignore=("eval_dataset", "trust_remote_code"), prompts=prompts_keys,
                                           world_size=args.world_size)
        self.dirs = None  # the RunDir, while train() holds the directory

    # ---- paths, models, pairs

    def iter_dir(self, t: int) -> Path:
        return self.out / f"iteration-{t}"

    def model_dir(self, t: int) -> str:
        """theta_t: the SFT model for t = 0, else the model saved by iteration t-1."""
        return self.cfg.model.model_name_or_path if t == 0 else str(self.iter_dir(t - 1) / "model")

    def load_model(self, t: int):
        """theta_t for generation and scoring (a LoRA SFT output: its base with the adapter)."""
        from transformers import set_seed

        from tunesmith.models import load_model_and_tokenizer

        m = self.cfg.model
        set_seed(self.cfg.training.seed)  # a tokenizer without pad token gets a new embedding row: the same each load
        model, _ = load_model_and_tokenizer(self.model_dir(t), m.dtype, m.load_in_4bit, m.trust_remote_code,
                                            revision=None if t else m.model_revision,
                                            attn_implementation=m.attn_implementation)
        return model if m.load_in_4bit else model.to(self.device)

    def model_to_train(self, t: int, loaded):
        """theta_t ready to train: ``loaded`` (theta_t as loaded for generation) under a new LoRA adapter or as it
        is; a LoRA SFT output is reloaded with its adapter trainable (use_peft) or merged (full training). Dropout
        off with ``disable_dropout``."""
        from transformers import set_seed

        from tunesmith.models import disable_dropout, is_adapter_dir, load_for_training, wrap_lora

        cfg = self.cfg
        set_seed(cfg.training.seed)
        if loaded is None or is_adapter_dir(self.model_dir(t)):
            del loaded
            model = load_for_training(cfg, self.model_dir(t), revision=None if t else cfg.model.model_revision)
        elif cfg.lora.use_peft:
            model = wrap_lora(loaded, cfg.lora, quantized=cfg.model.load_in_4bit,
                              gradient_checkpointing=cfg.training.gradient_checkpointing)
        else:
            model = loaded
        if cfg.spin.disable_dropout:  # the policy passes run without dropout, as in the authors' trainer
            disable_dropout(model)
        return model

    def sources(self, t: int) -> list[int]:
        """Iterations whose generated answers iteration t trains on."""
        return [t, t - 1] if self.cfg.spin.mix_previous_iteration and t > 0 else [t]

    def loss(self, t: int):
        from tunesmith.preference.config import loss_settings

        return loss_settings(self.cfg.spin, self.cfg.spin.beta[t])

    def pairs(self, t: int, with_reference: bool = True):
        """The training pairs of iteration t (a memory-mapped table, in the order (source iteration, prompt index)):
        ``prompt_ids``, ``chosen_ids`` (the real answer), ``rejected_ids`` (the generated one), and with
        ``with_reference`` theta_t's ``ref_chosen`` / ``ref_rejected``."""
        from tunesmith.preference.pairs import with_reference as beside_reference
        from tunesmith.recipes.spin.data import assemble_pairs, read_generations

        size = self.cfg.spin.shard_size
        gens = [read_generations(self.iter_dir(s) / "generations", len(self.prompts), size) for s in self.sources(t)]
        pairs = assemble_pairs(self.prompts, gens)
        return beside_reference(pairs, self.iter_dir(t) / "reference", size) if with_reference else pairs

    def eval_losses(self, model) -> dict:
        """The noise-free loss of every held-out source: ``eval_loss`` for one, ``eval_<name>_loss`` for several."""
        from tunesmith.data.collate import Collator
        from tunesmith.scoring import rows_loss

        args = self.cfg.training
        losses = {name: rows_loss(model, rows, Collator(self.tokenizer.pad_token_id), args.per_device_eval_batch_size,
                                  self.device, args.process_index, args.world_size)["loss"]
                  for name, rows in self.eval_sets.items()}
        return {"eval_loss": next(iter(losses.values()))} if len(losses) == 1 else {
            f"eval_{name}_loss": loss for name, loss in losses.items()}

    # ---- the driver

    def train(self) -> str:
        """Run or resume every iteration, holding the output directory's lock (rank 0) throughout."""
        from tunesmith.progress import Stages
        from tunesmith.rundir import barrier, open_run

        cfg, main = self.cfg, self.cfg.training.process_index == 0
        with open_run(self.out, "spin", self.fingerprint, main=main, continues=True) as self.dirs:
            if self.dirs.finished:
                log.warning(f"{self.out}: this SPIN run has finished already; nothing to do")
                return str(self.iter_dir(cfg.spin.num_iterations - 1) / "model")
            progress = Stages(cfg.spin.num_iterations * len(STAGES), speak=main, say=log.info)
            for t in range(cfg.spin.num_iterations):
                self.run_iteration(t, progress)
            if main:
                self.write_summary()
                save_yaml(cfg, self.out / "tunesmith.yaml")  # written last: the whole run is finished
            barrier()
        return str(self.iter_dir(cfg.spin.num_iterations - 1) / "model")

    def run_iteration(self, t: int, progress) -> None:
        """The stages of iteration t that are not recorded as finished, each recorded when it finishes."""
        cfg, main = self.cfg, self.cfg.training.process_index == 0
        what = {"generate": f"generate answers to {len(self.prompts)} prompts",
                "reference": "score real and generated answers (reference log-probs)",
                "train": "train on the pairs and save the model"}
        loaded = []  # theta_t, loaded once per iteration when a stage first needs it
        for stage in STAGES:
            label = f"SPIN iteration {t + 1} of {cfg.spin.num_iterations}: {what[stage]}"
            if self.dirs.stage(f"iteration-{t}/{stage}") is not None:
                progress.skip(label)
                continue
            if stage == "reference" and not self.loss(t).needs_reference:
                progress.skip(label, "not needed (the loss has no reference)")
                continue
            progress.start(label)
            if stage == "train":  # training takes theta_t over: no other reference to it stays alive
                metrics = stages.train(self, t, lambda: self.model_to_train(t, loaded.pop() if loaded else None))
                if main:  # checkpoints are no longer needed once the model is saved
                    for checkpoint in (self.iter_dir(t) / "trainer").glob("checkpoint-*"):
                        shutil.rmtree(checkpoint, ignore_errors=True)
            elif stage == "generate" and cfg.spin.generation_backend == "vllm":
                metrics = stages.generate(self, t, None)  # vLLM loads theta_t itself
            else:
                if not loaded:
                    loaded.append(self.load_model(t))
                metrics = getattr(stages, stage)(self, t, loaded[0])
            self.dirs.finish_stage(f"iteration-{t}/{stage}", metrics)
            progress.end()
            if main:
                self.write_summary()
                log.info("  " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in metrics.items()))
            if self.on_event:
                self.on_event(stage + "_done", t, None)

    def write_summary(self) -> None:
        write_summary(self.out, self.dirs.stage, self.cfg.spin.num_iterations)


def train(config, callbacks=(), on_event=None) -> str:
    """Run (or resume) every SPIN iteration. ``config``: a SPINConfig or a dict of its keys. Returns the final model.

    ``callbacks`` are extra TrainerCallbacks; ``on_event(stage, iteration, shard)`` is called after every shard and
    stage written (both hooks exist for monitoring and for the crash tests).
    """
    from tunesmith.recipes.training import check_max_length

    cfg = config if isinstance(config, SPINConfig) else build_config(SPINConfig, dict(config), "config")
    check_max_length(cfg)
    return SpinRun(cfg, callbacks, on_event).train()


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
