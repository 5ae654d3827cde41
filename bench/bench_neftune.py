"""NEFTune overhead: SFT step time with ``neftune_noise_alpha=5`` vs 0, same model, data and seed, one process.

Each repetition trains the ~10M-parameter Llama-style model of bench_sft.py twice through tunesmith's SFT trainer
(``tunesmith.recipes.sft.TunesmithTrainer``, built as ``tunesmith.recipes.sft.train`` builds it), once per alpha;
the order
alternates between repetitions (0,5 / 5,0 / ...) so drift on the shared CPU hits both arms alike. A callback reads
the process CPU time (time.process_time) around every optimizer step; both arms draw the same batches in the same
order (same seed), so step k of one arm is paired with step k of the other. Reported:

  * median step time of each arm (CPU seconds and wall seconds), over all measured steps of all repetitions;
  * overhead = median over repetitions of (sum of alpha-5 step times / sum of alpha-0 step times) - 1, and the
    median of the per-step paired ratios (a second, outlier-robust estimate);
  * the isolated cost of ``add_noise_to_batch`` on the same batches (micro-benchmark), as a fraction of a step.

    OMP_NUM_THREADS=1 python bench/bench_neftune.py          # full run (several minutes)
    python bench/bench_neftune.py --quick                     # smoke check (< 60 s)
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

TARGET = 0.02


def make_step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """CPU and wall seconds of every optimizer step (forward, backward, clip, optimizer, scheduler)."""

        def __init__(self):
            self.cpu, self.wall = [], []

        def on_step_begin(self, args, state, control, **kw):
            self._c, self._t = time.process_time(), time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.cpu.append(time.process_time() - self._c)
            self.wall.append(time.perf_counter() - self._t)

    return StepTimer()


def train_once(ws, work: Path, alpha: float, total_steps: int) -> dict:
    """One SFT run through TunesmithTrainer with per-step timing; returns step times and the logged losses."""
    from transformers import set_seed

    from tunesmith.config import build_config
    from tunesmith.data.collate import Collator
    from tunesmith.models import ensure_pad_token, load_for_training, load_tokenizer
    from tunesmith.recipes.sft import SFTConfig, TunesmithTrainer, prepare_data

    out = work / f"neftune-{alpha:g}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = build_config(SFTConfig, common.tunesmith_config(ws, str(out), total_steps, 1, neftune_noise_alpha=alpha),
                       "bench")
    set_seed(cfg.training.seed)
    tok = load_tokenizer(cfg.model.model_name_or_path)
    ensure_pad_token(tok)
    _, train_set, _, _, _ = prepare_data(cfg, tok)
    model = load_for_training(cfg)
    timer = make_step_timer()
    trainer = TunesmithTrainer(model=model, args=cfg.training, train_dataset=train_set,
                               data_collator=Collator(tok.pad_token_id),
                               processing_class=tok, neftune=cfg.neftune,
                               callbacks=[timer])
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    shutil.rmtree(out, ignore_errors=True)
    return {"cpu": timer.cpu, "wall": timer.wall, "losses": losses}


def interleaved_steps(ws, work: Path, alpha: float, n_batches: int, reps: int) -> dict:
    """Forward + backward of ``TunesmithTrainer.training_step`` (where the noise is added) with alpha 0 and alpha,
    alternating per batch (A B / B A), on the same model and the same batches; no optimizer step, so the weights
    (and every number but the noise) are the same for both arms. Returns per-call CPU and wall seconds per arm."""
    from tunesmith.config import NEFTuneArgs, build_config
    from tunesmith.data.collate import Collator
    from tunesmith.data.tokenize import IGNORE
    from tunesmith.models import ensure_pad_token, load_for_training, load_tokenizer
    from tunesmith.recipes.sft import SFTConfig, TunesmithTrainer, prepare_data

    trainers = {}
    model = tok = batches = None
    for a in (0.0, alpha):
        cfg = build_config(SFTConfig, common.tunesmith_config(ws, str(work / f"interleaved-{a:g}"), 1, 1,
                                                              neftune_noise_alpha=a), "bench")
        if model is None:
            tok = load_tokenizer(cfg.model.model_name_or_path)
            ensure_pad_token(tok)
            _, rows, _, _, _ = prepare_data(cfg, tok)
            collate, bs = Collator(tok.pad_token_id), ws.size.batch_size
            batches = [collate(rows[i * bs:(i + 1) * bs]) for i in range(n_batches)]
            model = load_for_training(cfg)
        trainers[a] = TunesmithTrainer(model=model, args=cfg.training, train_dataset=rows, data_collator=collate,
                                       processing_class=tok, neftune=NEFTuneArgs(a))
    times = {a: {"cpu": [], "wall": []} for a in trainers}
    for rep in range(reps + 1):  # the first pass is a warm-up
        for i, b in enumerate(batches):
            n_items = int((b["labels"] != IGNORE).sum())
            for a in ((0.0, alpha) if (rep + i) % 2 == 0 else (alpha, 0.0)):
                c, t = time.process_time(), time.perf_counter()
                trainers[a].training_step(model, b, num_items_in_batch=n_items)
                cpu, wall = time.process_time() - c, time.perf_counter() - t
                model.zero_grad(set_to_none=True)
                if rep:
                    times[a]["cpu"].append(cpu)
                    times[a]["wall"].append(wall)
    return times


def noise_microbench(ws, n_batches: int, repeats: int) -> dict:
    """Seconds per batch of the embedding lookup alone vs add_noise_to_batch (lookup + scale + noise), same batches,
    interleaved; forward only, with autograd on as in training."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.data.collate import Collator
    from tunesmith.data.prepare import tokenize_examples
    from tunesmith.data.source import read_examples
    from tunesmith.data.templates import get_template
    from tunesmith.neftune import add_noise_to_batch

    tok = AutoTokenizer.from_pretrained(ws.model_dir)
    rows, _ = tokenize_examples(read_examples(ws.data_file, dataset_format="prompt_completion"), tok,
                                get_template(common.TEMPLATE, tok), ws.size.max_length)
    collate, bs = Collator(tok.pad_token_id), ws.size.batch_size
    batches = [collate(rows[i * bs:(i + 1) * bs]) for i in range(n_batches)]
    model = AutoModelForCausalLM.from_pretrained(ws.model_dir, dtype=torch.float32).train()
    emb = model.get_input_embeddings()
    plain, noised = [], []
    for _ in range(repeats):
        c = time.process_time()
        for b in batches:
            emb(b["input_ids"])
        plain.append((time.process_time() - c) / n_batches)
        c = time.process_time()
        for b in batches:
            add_noise_to_batch(model, b, 5.0)
        noised.append((time.process_time() - c) / n_batches)
    return {"plain": common.median(plain), "noised": common.median(noised)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="measured optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=3, help="steps of each run left out of the measurement")
    ap.add_argument("--reps", type=int, default=4, help="repetitions (each trains both arms, order alternating)")
    ap.add_argument("--alpha", type=float, default=5.0)
    ap.add_argument("--interleaved-batches", type=int, default=12, help="batches of the interleaved measurement")
    ap.add_argument("--interleaved-reps", type=int, default=3, help="passes over them (plus one warm-up pass)")
    ap.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke check")
    ap.add_argument("--workdir", help="keep the workspace here (default: a temporary directory)")
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)
    if args.quick:
        args.steps, args.warmup, args.reps = min(args.steps, 4), 2, 2
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-neftune-"))
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    ws = common.make_workspace(work, "quick" if args.quick else "full")
    s = ws.size
    print(f"model: Llama, {ws.n_params / 1e6:.2f}M parameters (hidden {s.hidden}, {s.layers} layers); batch "
          f"{s.batch_size}, max_length {s.max_length}; float32 CPU; {common.threads_note()}")
    print(f"{args.reps} repetitions x 2 arms (alpha 0 and {args.alpha:g}), {args.warmup} warm-up + {args.steps} "
          "measured steps each")
    print(common.threads_warning() + ("(--quick: a smoke check; its figures mean nothing)\n" if args.quick else ""))

    arms = {0.0: [], args.alpha: []}
    for rep in range(args.reps):
        for alpha in ((0.0, args.alpha) if rep % 2 == 0 else (args.alpha, 0.0)):
            with common.quiet(work / "runs.log"):
                res = train_once(ws, work, alpha, args.warmup + args.steps)
            res["cpu"], res["wall"] = res["cpu"][args.warmup:], res["wall"][args.warmup:]
            arms[alpha].append(res)
            print(f"  rep {rep + 1} alpha {alpha:4g}: {sum(res['cpu']):7.2f} CPU s, {sum(res['wall']):7.2f} wall s "
                  f"for {len(res['cpu'])} steps; loss at step {args.warmup}: {res['losses'][args.warmup - 1]:.4f}",
                  flush=True)

    off, on = arms[0.0], arms[args.alpha]
    same_off = all(r["losses"] == off[0]["losses"] for r in off)
    noise_changes_loss = all(a["losses"] != b["losses"] for a, b in zip(off, on))
    print(f"\nalpha 0 runs reproduce each other exactly: {'yes' if same_off else 'NO'}; "
          f"noise changes the training losses: {'yes' if noise_changes_loss else 'NO'}")
    for kind in ("cpu", "wall"):
        step_off = common.median([t for r in off for t in r[kind]])
        step_on = common.median([t for r in on for t in r[kind]])
        per_rep = [sum(b[kind]) / sum(a[kind]) for a, b in zip(off, on)]
        paired = [tb / ta for a, b in zip(off, on) for ta, tb in zip(a[kind], b[kind])]
        overhead, overhead_paired = common.median(per_rep) - 1, common.median(paired) - 1
        verdict = "met" if overhead <= TARGET else "MISSED"
        print(f"[{kind:4s}] median step: alpha 0 {step_off * 1000:7.1f} ms, alpha {args.alpha:g} {step_on * 1000:7.1f}"
              f" ms;  overhead {100 * overhead:+.2f}% (per-rep ratios "
              f"{', '.join(f'{100 * (x - 1):+.1f}%' for x in per_rep)}; target <= {100 * TARGET:.0f}%: {verdict});"
              f"  paired per-step median {100 * overhead_paired:+.2f}%")
    n_b, n_r = (3, 2) if args.quick else (args.interleaved_batches, args.interleaved_reps)
    with common.quiet(work / "runs.log"):
        inter = interleaved_steps(ws, work, args.alpha, n_b, n_r)
    print(f"\ninterleaved forward+backward (TunesmithTrainer.training_step, same weights, {n_b} batches x {n_r} "
          "passes, arms alternating per call):")
    for kind in ("cpu", "wall"):
        a, b = inter[0.0][kind], inter[args.alpha][kind]
        paired = [y / x for x, y in zip(a, b)]
        ratio_sum = sum(b) / sum(a) - 1
        print(f"[{kind:4s}] median call: alpha 0 {common.median(a) * 1000:7.1f} ms, alpha {args.alpha:g} "
              f"{common.median(b) * 1000:7.1f} ms;  paired per-call median {100 * (common.median(paired) - 1):+.2f}%, "
              f"ratio of sums {100 * ratio_sum:+.2f}%  (target <= {100 * TARGET:.0f}%: "
              f"{'met' if common.median(paired) - 1 <= TARGET else 'MISSED'})")
    micro = noise_microbench(ws, n_batches=5 if args.quick else 40, repeats=3 if args.quick else 7)
    step_cpu = common.median([t for r in off for t in r["cpu"]])
    extra = micro["noised"] - micro["plain"]
    print(f"[micro] embedding lookup {micro['plain'] * 1e3:.3f} ms/batch, with NEFTune noise "
          f"{micro['noised'] * 1e3:.3f} ms/batch: +{extra * 1e3:.3f} ms = {100 * extra / step_cpu:.3f}% of a "
          "training step (forward only; the backward of an add is a copy of the gradient)")
    print(f"total bench time {time.perf_counter() - t_all:.1f} s")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
