"""SPIN benchmark, one process, one model and one set of pairs for every contender:

* training step time: tunesmith's PreferenceTrainer (SPIN's trainer) (reference log-probs stored with the pairs) vs
  TRL's DPOTrainer with a reference copy scored every step, and vs TRL with ``precompute_ref_log_probs`` (its one-off
  precompute is timed apart, like tunesmith's reference stage);
* generation: tunesmith's batched, left-padded generation (the call SPIN's generate stage makes) vs a per-prompt
  ``model.generate`` loop like the source article's.

The contenders run their own ``training_step`` + optimizer step in alternation, step i on the same batch for all
(paired, so load from other processes on the machine hits all alike); setup, warm-up steps and any precompute are
excluded. Targets: <= 0.6x TRL per-step reference, <= 1.0x TRL precompute,
>= 5x the per-prompt loop.

    python bench/bench_spin.py                # ~10M-parameter Llama (a few minutes on 2 CPU cores)
    python bench/bench_spin.py --size quick   # smoke test
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TEMPLATE, make_workspace, threads_note  # noqa: E402  (sets offline env, src on sys.path)

import torch  # noqa: E402


def trainer_step(trainer, steps: int):
    """A function running step i of ``trainer`` (its own training_step: loss, backward; then the optimizer step) on
    the i-th batch of its own train dataloader, returning the seconds it took."""
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's own loop, which is not used here
    model = trainer.model.train()
    batches = []
    for b in trainer.get_train_dataloader():
        batches.append(b)
        if len(batches) == steps:
            break

    def step(i: int) -> float:
        t0 = time.perf_counter()
        trainer.training_step(model, batches[i])
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        return time.perf_counter() - t0

    return step


def common_args(out: str, batch: int) -> dict:
    return dict(output_dir=out, per_device_train_batch_size=batch, learning_rate=1e-5, lr_scheduler_type="constant",
                warmup_steps=0, optim="adamw_torch", save_strategy="no", report_to="none", use_cpu=True, bf16=False,
                disable_tqdm=True, dataloader_num_workers=0, seed=0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="full", choices=["full", "quick"])
    ap.add_argument("--steps", type=int, default=0, help="training steps per contender (default 10 / 6)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--gen-prompts", type=int, default=0, help="prompts for the generation comparison")
    ap.add_argument("--max-new-tokens", type=int, default=0)
    a = ap.parse_args()
    full = a.size == "full"
    steps = a.steps or (10 if full else 6)
    n_gen = a.gen_prompts or (64 if full else 16)
    max_new = a.max_new_tokens or (64 if full else 16)

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from transformers import TrainingArguments

    from tunesmith.data.source import read_examples
    from tunesmith.preference.loss import LossSettings
    from tunesmith.preference.pairs import PairCollator, score_pairs
    from tunesmith.preference.trainer import PreferenceTrainer
    from tunesmith.recipes.spin.config import SPINArgs
    from tunesmith.recipes.spin.data import prompt_rows
    from tunesmith.data.templates import get_template
    from tunesmith.generate import generate
    from tunesmith.models import load_model_and_tokenizer

    root = Path(tempfile.mkdtemp(prefix="bench-spin-"))
    ws = make_workspace(root, a.size)
    model, tok = load_model_and_tokenizer(ws.model_dir)
    model.eval()
    template = get_template(TEMPLATE, tok)
    batch = ws.size.batch_size
    n_pairs = max(n_gen, batch * steps)
    examples = read_examples(ws.data_file, dataset_format="prompt_completion")
    cols = prompt_rows(examples, tok, template, ws.size.max_length)
    prompts = [dict(zip(cols, values)) for values in zip(*cols.values()) if values[-1]][:n_pairs]  # room to answer
    print(f"model {ws.n_params / 1e6:.1f}M params, {ws.size.layers} layers; {len(prompts)} pairs, batch {batch} "
          f"pairs, {steps} steps (timed {a.warmup + 1}..{steps}); {threads_note()}")

    # ---------------------------------------------------------------- generation
    # every pair's answer comes from tunesmith's batched generation; the first n_gen prompts are also generated one
    # by one, chunk by chunk in alternation with the batched calls, so machine load hits both alike
    ids = [p["prompt_ids"] for p in prompts]
    gen_batch = SPINArgs().generation_batch_size
    outs, t_batched, t_loop = [], 0.0, 0.0
    for start in range(0, len(ids), gen_batch):
        chunk = ids[start:start + gen_batch]
        t0 = time.perf_counter()
        outs += generate(model, tok, chunk, batch_size=gen_batch, max_new_tokens=max_new, do_sample=False)
        if start < n_gen:
            t_batched += time.perf_counter() - t0
            t0 = time.perf_counter()
            with torch.no_grad():
                for p in chunk[:n_gen - start]:
                    model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                   max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id)
            t_loop += time.perf_counter() - t0
    new_tokens = sum(o["new_tokens"] for o in outs[:n_gen])
    print(f"\ngeneration, {n_gen} prompts, max_new_tokens {max_new} ({new_tokens} new tokens):")
    print(f"  tunesmith batched ({gen_batch}/batch, SPIN's default): {t_batched:7.2f} s    per-prompt loop: "
          f"{t_loop:7.2f} s    speed-up {t_loop / t_batched:5.2f}x   (target >= 5x)")

    # ---------------------------------------------------------------- pairs
    pairs = [{"prompt_ids": p["prompt_ids"], "chosen_ids": p["real_ids"],
              "rejected_ids": o["output_ids"] + ([] if o["truncated"] else p["end_ids"])}
             for p, o in zip(prompts, outs)]
    collate = PairCollator(tok.pad_token_id, ws.size.max_length)
    t0 = time.perf_counter()
    ref_r, ref_g = score_pairs(model, pairs, collate, batch, "cpu")
    t_ref = time.perf_counter() - t0
    for pair, r, g in zip(pairs, ref_r, ref_g):
        pair["ref_chosen"], pair["ref_rejected"] = r, g
    texts = Dataset.from_list([{"prompt": tok.decode(p["prompt_ids"], skip_special_tokens=True),
                                "chosen": tok.decode(p["real_ids"], skip_special_tokens=True),
                                "rejected": o["output"]} for p, o in zip(prompts, outs)])

    # ---------------------------------------------------------------- training steps
    # the three contenders step in alternation on the same batches (same seed -> same sampler order); per contender
    # the median step time over the timed steps, and the median of the per-step ratios (a paired comparison)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(**common_args(f"{tmp}/s", batch))
        ours = PreferenceTrainer(model=copy.deepcopy(model), args=args, train_dataset=pairs, data_collator=collate,
                                 loss=LossSettings(beta=0.1))
        contenders = {"tunesmith SPIN (stored reference)": ours}
        for name, precompute in (("TRL DPO, reference copy every step", False),
                                 ("TRL DPO, precompute_ref_log_probs", True)):
            cfg = DPOConfig(**common_args(f"{tmp}/trl{int(precompute)}", batch), beta=0.1, loss_type=["sigmoid"],
                            max_length=ws.size.max_length, precompute_ref_log_probs=precompute,
                            precompute_ref_batch_size=batch)
            t0 = time.perf_counter()
            contenders[name] = DPOTrainer(model=copy.deepcopy(model),
                                          ref_model=None if precompute else copy.deepcopy(model).eval(), args=cfg,
                                          train_dataset=texts, processing_class=tok)
            if precompute:
                t_trl_pre = time.perf_counter() - t0
        steppers = {name: trainer_step(tr, steps) for name, tr in contenders.items()}
        times = {name: [] for name in steppers}
        names = list(steppers)
        for i in range(steps):
            for name in names[i % 3:] + names[:i % 3]:  # rotate who goes first
                times[name].append(steppers[name](i))

    timed = slice(a.warmup, steps)
    ours_name = names[0]
    print(f"\ntraining step, {batch} pairs per step (median of steps {a.warmup + 1}..{steps}, interleaved):")
    for name in names:
        print(f"  {name:<40} {statistics.median(times[name][timed]) * 1000:8.1f} ms/step")
    for name, target in ((names[1], 0.6), (names[2], 1.0)):
        ratio = statistics.median(o / t for o, t in zip(times[ours_name][timed], times[name][timed]))
        print(f"  tunesmith / {name:<37} {ratio:5.2f}x  (target <= {target}x)")
    print(f"  one-off reference pass over {len(pairs)} pairs: tunesmith {t_ref:.2f} s; TRL precompute (inside its "
          f"init, with tokenization) {t_trl_pre:.2f} s")

if __name__ == "__main__":
    main()
