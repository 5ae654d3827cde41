#!/usr/bin/env python3
"""DPO on the demo world: choose the demo's DPO recipe on validation people, as scripts/spin_sweep.py chose SPIN's.

SFT on the FIT people (the demo's TRAIN people minus the validation people; spin_sweep's split and SFT run, reused
when already there), then DPO from it on preference pairs built from the FIT rows (the real answer against the same
answer with one wrong fact: ``World.preference_pairs``), measured on the VALIDATION people's prompts with the fact
judge; the demo's held-out people are never used.

    python scripts/dpo_sweep.py NAME [key=value ...]        # key=value: DPO config overrides (YAML values)

One row per run is appended to ``--results`` (JSONL). Run it niced with one thread: it shares a small machine.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import spin_sweep as S  # noqa: E402  (the demo world, the FIT/VALIDATION split, SFT, evaluation, win rates)


def dpo_settings(overrides: dict) -> dict:
    """The demo's DPO config keys with ``overrides`` on top."""
    from tunesmith.demo.run import dpo_config

    c = dpo_config(S.demo_cfg(), Path("SFT"), {"pairs": "P", "heldout_sample": "H"}, Path("OUT"), 0)
    for k in ("model_name_or_path", "dataset", "output_dir", "seed"):
        c.pop(k)
    return c | overrides


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="/tmp/spin_sweep")
    p.add_argument("--results", default=str(Path(__file__).resolve().parent / "dpo_sweep_results.jsonl"))
    args = p.parse_args(argv)
    overrides = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.overrides)}

    from tunesmith.io import atomic_write_jsonl
    from tunesmith.recipes import dpo

    base, world, judge = S.world_and_judge()
    work, seed = Path(args.work), args.seed
    data = S.sweep_data(world, judge, work)
    t0 = time.time()
    sft_dir = S.train_sft(base, data, work / f"sft-fit-seed{seed}", seed)
    sft_m = S.evaluate(sft_dir, work / f"sft-fit-seed{seed}-eval", "sft", data, judge)
    fit = [json.loads(line) for line in Path(data["train"]).read_text().splitlines() if line.strip()]
    pairs = work / "data" / "fit_pairs.jsonl"
    atomic_write_jsonl(pairs, world.preference_pairs(fit, seed=0))
    settings = dpo_settings(overrides)
    out = work / "dpo" / args.name
    if not (out / "tunesmith.yaml").exists():
        dpo.train(dict(settings, model_name_or_path=str(sft_dir), dataset=str(pairs), output_dir=str(out), seed=seed))
    run_dir = work / "dpo" / f"{args.name}-eval"
    measures = S.evaluate(out, run_dir, args.name, data, judge)
    win = S.win_vs(judge, run_dir, work / f"sft-fit-seed{seed}-eval", seed)
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in logs if "rewards/margin" in e and "loss" in e]
    row = {"kind": "dpo-sweep", "name": args.name, "seed": seed, "overrides": overrides, "settings": settings,
           "sft": sft_m, "dpo": measures,
           "win": {k: win[k] for k in ("win_rate", "ci_low", "ci_high", "wins", "losses", "draws")},
           "last_step": {k: steps[-1][k] for k in ("loss", "rewards/margin", "rewards/accuracy", "logps/chosen",
                                                   "logps/rejected")},
           "first_step": {k: steps[0][k] for k in ("logps/chosen", "logps/rejected")},
           "seconds": round(time.time() - t0)}
    with open(args.results, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
