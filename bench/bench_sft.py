"""SFT throughput: tunesmith vs TRL's SFTTrainer vs a plain PyTorch loop, in one process.

The same run three ways — a ~10M-parameter Llama-style model built from a config, the same prompt/completion data
(tunesmith's ``instruction_response`` template; TRL gets the identical text as prompt/completion), the same batch
size, max_length, learning rate and number of optimizer steps, float32 on CPU, loss on completion tokens only:

  tunesmith  ``tunesmith.recipes.sft.train`` with a dict config (report_to none, save_strategy no,
             train_loss_eval_samples 0)
             and its defaults (random batches, padded): exactly the batches TRL and the plain loop see
  tunesmith free  the same with padding_free=true: the same examples per step in one unpadded row (same loss)
  TRL        ``trl.SFTTrainer`` (bf16=False, use_cpu, completion-only loss, padding_free off = TRL's default;
             gradient checkpointing OFF so the computation matches — TRL's own default is ON, see --trl-defaults)
  plain      AdamW + ``model(**batch).loss`` / backward / step over batches from tunesmith's data path
             (tokenize_examples + Collator) in the order the Trainer's seeded sampler draws them

Throughput is measured after ``--warmup`` optimizer steps over the next ``--steps`` steps: for the two Trainer runs
from their log events (``train_runtime`` and ``num_input_tokens_seen`` with include_num_input_tokens_seen =
"non_padding"; the same log frequency for both), for the plain loop with perf_counter. Tokens are non-padding
tokens (the attention mask's sum). Memory is each phase's resident-set high-water mark (see common.PeakRSS).

    OMP_NUM_THREADS=1 python bench/bench_sft.py            # full run (a few minutes)
    python bench/bench_sft.py --quick                       # smoke check (< 60 s)
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (sets the offline environment before transformers is imported)

TARGET_TRL, TARGET_PLAIN = 1.5, 0.9


def run_tunesmith(ws, work: Path, total_steps: int, log_every: int, profile: bool = False, **over) -> dict:
    from tunesmith.recipes.sft import train

    out = work / "tunesmith-out"
    shutil.rmtree(out, ignore_errors=True)
    cfg = common.tunesmith_config(ws, str(out), total_steps, log_every, **over)
    c0, t0 = time.process_time(), time.perf_counter()
    if profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.runcall(train, cfg)
        stats = pstats.Stats(prof)
        print("\n--- cProfile of one tunesmith train() call, top by own time ---")
        stats.sort_stats("tottime").print_stats(25)
        print("--- top by cumulative time ---")
        stats.sort_stats("cumulative").print_stats(45)
    else:
        train(cfg)
    return {"cpu": time.process_time() - c0, "wall": time.perf_counter() - t0,
            "logs": common.read_jsonl(out / "metrics.jsonl")}


def run_trl(ws, work: Path, total_steps: int, log_every: int, gradient_checkpointing: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    out = work / "trl-out"
    shutil.rmtree(out, ignore_errors=True)
    c0, t0 = time.process_time(), time.perf_counter()
    tok = AutoTokenizer.from_pretrained(ws.model_dir)
    model = AutoModelForCausalLM.from_pretrained(ws.model_dir, dtype=torch.float32)
    data = Dataset.from_list([common.render_for_trl(r) for r in ws.records])
    args = SFTConfig(output_dir=str(out), max_length=ws.size.max_length, per_device_train_batch_size=ws.size.batch_size,
                     max_steps=total_steps, learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0,
                     logging_steps=log_every, save_strategy="no", report_to="none", seed=0, use_cpu=True, bf16=False,
                     completion_only_loss=True, padding_free=False, packing=False,
                     gradient_checkpointing=gradient_checkpointing, include_num_input_tokens_seen="non_padding",
                     disable_tqdm=True, dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    return {"cpu": time.process_time() - c0, "wall": time.perf_counter() - t0, "logs": trainer.state.log_history}


def measure_trainer(run, warmup: int, steps: int) -> dict:
    """CPU seconds and tokens of ``steps`` optimizer steps after ``warmup`` steps, for a Trainer-based run.

    CPU time (time.process_time: every thread of this process) is taken by difference: the same run with
    warmup + steps and with warmup steps only. Setup (data preparation, model loading, the final save) and the
    first ``warmup`` steps are identical in both and cancel. The wall-clock window comes from the longer run's own
    log events (train_runtime at step warmup and at step warmup + steps).
    """
    short = run(warmup)
    long = run(warmup + steps)
    tokens = _final(long["logs"], "num_input_tokens_seen") - _final(short["logs"], "num_input_tokens_seen")
    wall, wall_tokens = common.window(long["logs"], warmup, warmup + steps)
    assert wall_tokens == tokens, (wall_tokens, tokens)
    return {"cpu": long["cpu"] - short["cpu"], "wall": wall, "tokens": tokens,
            "loss": _loss_at(long["logs"], warmup), "phase_wall": short["wall"] + long["wall"]}


def _final(logs: list[dict], key: str):
    return [e[key] for e in logs if key in e][-1]


def _loss_at(logs: list[dict], step: int) -> float | None:
    for e in logs:
        if e.get("step") == step and "loss" in e:
            return e["loss"]
    return None


def tunesmith_batches(ws):
    """Tokenized examples from tunesmith's data path, in the order the Trainer's seeded sampler draws them
    (accelerate's SeedableRandomSampler: randperm with a generator seeded with the run's seed, epoch 0)."""
    import torch
    from transformers import AutoTokenizer

    from tunesmith.data.collate import Collator
    from tunesmith.data.prepare import tokenize_examples
    from tunesmith.data.source import read_examples
    from tunesmith.data.templates import get_template

    tok = AutoTokenizer.from_pretrained(ws.model_dir)
    examples = read_examples(ws.data_file, dataset_format="prompt_completion")
    rows, _ = tokenize_examples(examples, tok, get_template(common.TEMPLATE, tok), ws.size.max_length)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    return [rows[i] for i in order], Collator(tok.pad_token_id)


def run_plain(ws, warmup: int, steps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    rows, collate = tunesmith_batches(ws)
    model = AutoModelForCausalLM.from_pretrained(ws.model_dir, dtype=torch.float32)
    model.train()
    # the optimizer implementation both Trainers use by default (adamw_torch_fused), same lr and weight decay (0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
    bs = ws.size.batch_size
    tokens = losses = 0
    loss_sum = 0.0
    start = cstart = None
    for step in range(warmup + steps):
        if step == warmup:
            start, cstart = time.perf_counter(), time.process_time()
        batch = collate(rows[step * bs:(step + 1) * bs])
        if step >= warmup:
            tokens += int(batch["attention_mask"].sum())
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step < warmup:
            loss_sum += loss.item()
            losses += 1
    cpu, wall = time.process_time() - cstart, time.perf_counter() - start
    return {"cpu": cpu, "wall": wall, "tokens": tokens, "loss": loss_sum / max(losses, 1),
            "phase_wall": time.perf_counter() - t0}


def warm_up_torch(ws) -> None:
    """One throw-away forward/backward so first-call costs (kernel selection, allocator growth) hit no phase."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ws.model_dir, dtype=torch.float32)
    ids = torch.randint(3, model.config.vocab_size, (ws.size.batch_size, ws.size.max_length // 2))
    model(input_ids=ids, labels=ids).loss.backward()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="measured optimizer steps (rounded up to a multiple of "
                                                          "--warmup, the log interval)")
    ap.add_argument("--warmup", type=int, default=5, help="optimizer steps before the measured window")
    ap.add_argument("--rounds", type=int, default=1, help="repeat all phases (alternating order); medians reported")
    ap.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke check")
    ap.add_argument("--profile", action="store_true", help="cProfile the tunesmith phase and print the top entries")
    ap.add_argument("--trl-defaults", action="store_true",
                    help="also measure TRL with its own default gradient_checkpointing=True")
    ap.add_argument("--packing", action="store_true",
                    help="also measure tunesmith with packing=True (same batch size and max_length; rows hold several "
                         "examples, so the steps see different, fuller batches: information, not the comparison)")
    ap.add_argument("--grouped", action="store_true",
                    help="also measure tunesmith with train_sampling_strategy=group_by_length (other batches)")
    ap.add_argument("--workdir", help="keep the workspace here (default: a temporary directory)")
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)  # the data summary and library warnings would drown the table
    if args.quick:
        args.steps, args.warmup = min(args.steps, 8), 2
    warmup = max(1, args.warmup)
    steps = -(-args.steps // warmup) * warmup

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-sft-"))
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    ws = common.make_workspace(work, "quick" if args.quick else "full")
    s = ws.size
    if (warmup + steps) * s.batch_size > len(ws.records):
        ap.error(f"{warmup + steps} steps of {s.batch_size} exceed one epoch of {len(ws.records)} examples (the plain "
                 "loop replays the Trainer's first-epoch order only)")
    print(f"model: Llama, {ws.n_params / 1e6:.2f}M parameters (hidden {s.hidden}, {s.layers} layers, vocab "
          f"{s.vocab}); data: {s.examples} prompt/completion examples, batch {s.batch_size}, max_length "
          f"{s.max_length}; float32 CPU; {common.threads_note()}")
    print(f"warm-up {warmup} steps, then {steps} measured steps per method, {args.rounds} round(s)")
    print(common.threads_warning() + ("(--quick: a smoke check; its figures mean nothing)\n" if args.quick else ""))
    warm_up_torch(ws)

    # "tunesmith" (defaults) and "tunesmith free" (padding_free: the same examples per step in one unpadded row, the
    # same loss) see exactly the batches TRL and the plain loop see; --grouped adds length-grouped sampling.
    phases = {"tunesmith": lambda: measure_trainer(lambda n: run_tunesmith(ws, work, n, warmup), warmup, steps),
              "tunesmith free": lambda: measure_trainer(
                  lambda n: run_tunesmith(ws, work, n, warmup, padding_free=True), warmup, steps),
              "TRL": lambda: measure_trainer(lambda n: run_trl(ws, work, n, warmup), warmup, steps),
              "plain": lambda: run_plain(ws, warmup, steps)}
    if args.trl_defaults:
        phases["TRL (GC on)"] = lambda: measure_trainer(
            lambda n: run_trl(ws, work, n, warmup, gradient_checkpointing=True), warmup, steps)
    if args.grouped:
        phases["tunesmith grp"] = lambda: measure_trainer(
            lambda n: run_tunesmith(ws, work, n, warmup, train_sampling_strategy="group_by_length"), warmup, steps)
    if args.packing:
        phases["tunesmith pack"] = lambda: measure_trainer(
            lambda n: run_tunesmith(ws, work, n, warmup, packing=True), warmup, steps)
    results: dict[str, list[dict]] = {k: [] for k in phases}
    names = list(phases)
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            with common.PeakRSS() as mem, common.quiet(work / "phases.log"):
                res = phases[name]()
            res["mem"] = mem
            results[name].append(res)
            print(f"  round {r + 1} {name:12s} {res['tokens']:6d} tokens: CPU {res['cpu']:7.2f} s = "
                  f"{res['tokens'] / res['cpu']:7.1f} tok/s, wall {res['wall']:7.2f} s = "
                  f"{res['tokens'] / res['wall']:7.1f} tok/s (phase {res['phase_wall']:.0f} s); {mem.describe()}",
                  flush=True)
    if args.profile:
        with common.quiet(work / "phases.log"):
            run_tunesmith(ws, work, warmup + steps, warmup, profile=True)

    if any(x["cpu"] <= 0 for v in results.values() for x in v):
        print("\nsome CPU-time differences are <= 0: setup noise exceeds the measured steps (normal with --quick); "
              "the CPU-time figures below are meaningless")
    cpu_tps = {k: common.median([x["tokens"] / max(x["cpu"], 1e-9) for x in v]) for k, v in results.items()}
    wall_tps = {k: common.median([x["tokens"] / x["wall"] for x in v]) for k, v in results.items()}
    print(f"\nmedian over {args.rounds} round(s); tokens = non-padding tokens of the {steps} measured steps")
    print("method        tok/s (CPU time)  CPU s/step   tok/s (wall)   peak RSS MiB   loss at step " + str(warmup))
    for k, v in results.items():
        loss = f"{v[-1]['loss']:.4f}" if v[-1]["loss"] is not None else "n/a"
        print(f"{k:13s} {cpu_tps[k]:16.1f}   {common.median([x['cpu'] for x in v]) / steps:9.3f}   "
              f"{wall_tps[k]:12.1f}   {max(x['mem'].peak for x in v):12.0f}   {loss}")
    same = {x["tokens"] for k in ("tunesmith", "tunesmith free", "TRL", "plain") for x in results[k]}
    print(f"\ntunesmith, tunesmith free, TRL and plain measured the same examples (same non-padding token count): "
          f"{'yes' if len(same) == 1 else 'NO ' + str(sorted(same))}")
    for label, tps in (("CPU time", cpu_tps), ("wall time", wall_tps)):
        r_trl, r_plain = tps["tunesmith"] / tps["TRL"], tps["tunesmith"] / tps["plain"]
        r_free = tps["tunesmith free"] / tps["TRL"]
        print(f"[{label:9s}] tunesmith / TRL = {r_trl:.3f}, padding-free / TRL = {r_free:.3f} (target >= {TARGET_TRL}: "
              f"{'met' if max(r_trl, r_free) >= TARGET_TRL else 'MISSED'});  tunesmith / plain = {r_plain:.3f} "
              f"(target >= {TARGET_PLAIN}: {'met' if r_plain >= TARGET_PLAIN else 'MISSED'})"
              + (f";  grouped / TRL = {tps['tunesmith grp'] / tps['TRL']:.3f}" if "tunesmith grp" in tps else "")
              + (f";  tunesmith / TRL(GC on) = {tps['tunesmith'] / tps['TRL (GC on)']:.3f}"
                 if "TRL (GC on)" in tps else "")
              + (f";  tunesmith packed / TRL = {tps['tunesmith pack'] / tps['TRL']:.3f}"
                 if "tunesmith pack" in tps else ""))
    print(f"total bench time {time.perf_counter() - t_all:.1f} s")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
