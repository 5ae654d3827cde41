"""DPO training steps: tunesmith's PreferenceTrainer (reference log-probs scored once and stored with the pairs) vs
TRL 1.16's DPOTrainer on the same model and the same token ids, in the same run:

* TRL default: a reference copy of the model scored at every step (``precompute_ref_log_probs`` off, TRL's default);
* TRL precompute: ``precompute_ref_log_probs`` on (the reference pass done before training, like tunesmith's).

Every contender gets identical batches: the pairs are tokenized once (tunesmith's template segments) and collated by
each trainer's own collator (TRL's ``DataCollatorForPreference``, tunesmith's ``PairCollator``), both cutting rows at
``max_length`` keeping the start. A step is the contender's own ``training_step`` (forward, loss, backward) plus the
optimizer step; setup, warm-up steps and any reference precompute are excluded from the step times.

Two cases (the issue's targets: step time <= 0.7x TRL's; peak RSS <= 0.5x TRL's at the large vocabulary):

  10M   the ~10M-parameter Llama of bench/common.py (vocabulary 4,096), batch 8 pairs x 256 tokens; the contenders
        step in alternation in one process (paired: machine load hits all alike), medians of the per-step ratios.
  152k  a Llama with a 152,064-entry vocabulary (width 64, 2 layers, tied embeddings: 9.8M parameters), batch 2
        pairs x 1,024 tokens; each contender in its own subprocess, so its peak RSS (VmHWM: the whole process,
        model load and optimizer included) is its own.

    OMP_NUM_THREADS=1 python bench/bench_dpo.py          # both cases (several minutes on 2 CPU cores)
    python bench/bench_dpo.py --quick                    # smoke test
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402  (offline environment, src on the path)

VOCAB_BIG = 152_064
CONTENDERS = ("tunesmith", "trl", "trl-precompute")
LABELS = {"tunesmith": "tunesmith (stored reference)", "trl": "TRL DPOTrainer (reference copy)",
          "trl-precompute": "TRL DPOTrainer (precompute_ref_log_probs)"}


def make_pairs(tok, records: list[dict], max_length: int) -> list[dict]:
    """Token pairs: each record's prompt, its own completion (chosen) and the next record's (rejected)."""
    from tunesmith.data.formats import Example, Turn
    from tunesmith.data.preference import Pair, encode_pairs
    from tunesmith.data.templates import get_template

    pairs = [Pair(Example(turns=[Turn(r["prompt"], None)]), r["completion"],
                  records[(i + 1) % len(records)]["completion"]) for i, r in enumerate(records)]
    rows = encode_pairs(tok, get_template(common.TEMPLATE, tok), pairs, max_length)
    return [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in rows if r["keep"] == 0]


def build_trainer(name: str, model, tok, pairs: list[dict], batch: int, max_length: int, out: str):
    """(trainer, batches): the contender's Trainer and its own collation of ``pairs`` into batches."""
    from datasets import Dataset

    from tunesmith.preference.loss import LossSettings
    from tunesmith.preference.pairs import PairCollator, score_pairs

    args = dict(output_dir=out, per_device_train_batch_size=batch, learning_rate=1e-5, lr_scheduler_type="constant",
                warmup_steps=0, optim="adamw_torch", save_strategy="no", report_to="none", use_cpu=True, bf16=False,
                disable_tqdm=True, dataloader_num_workers=0, seed=0)
    if name == "tunesmith":
        from transformers import TrainingArguments

        from tunesmith.preference.trainer import PreferenceTrainer

        collate = PairCollator(tok.pad_token_id, max_length)
        chosen, rejected = score_pairs(model.eval(), pairs, collate, batch, "cpu")  # the stored reference
        rows = [dict(p, ref_chosen=a, ref_rejected=b) for p, a, b in zip(pairs, chosen, rejected)]
        trainer = PreferenceTrainer(model=model, args=TrainingArguments(**args), train_dataset=rows,
                                    data_collator=collate, loss=LossSettings(beta=0.1))
        return trainer, [collate(rows[i:i + batch]) for i in range(0, len(rows) - batch + 1, batch)]
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    precompute = name == "trl-precompute"
    cfg = DPOConfig(**args, beta=0.1, loss_type=["sigmoid"], max_length=max_length,
                    precompute_ref_log_probs=precompute)
    text = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}])  # batches are built below
    trainer = DPOTrainer(model=model, ref_model=None if precompute else copy.deepcopy(model).eval(), args=cfg,
                         train_dataset=text, processing_class=tok)
    collate = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=max_length)
    if precompute:  # the reference log-probs TRL's precompute would store (the same values tunesmith stores)
        ours = PairCollator(tok.pad_token_id, max_length)
        chosen, rejected = score_pairs(model.eval(), pairs, ours, batch, "cpu")
        pairs = [dict(p, ref_chosen_logps=a, ref_rejected_logps=b) for p, a, b in zip(pairs, chosen, rejected)]
    return trainer, [collate(pairs[i:i + batch]) for i in range(0, len(pairs) - batch + 1, batch)]


def stepper(trainer, batches: list):
    """A function running step i (the trainer's own training_step, then the optimizer step) on batch i, returning
    its seconds."""
    trainer.create_optimizer_and_scheduler(num_training_steps=len(batches))
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's own loop, which is not used here
    model = trainer.model.train()

    def step(i: int) -> float:
        t0 = time.perf_counter()
        trainer.training_step(model, batches[i % len(batches)])
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        return time.perf_counter() - t0

    return step


# ------------------------------------------------------------------------------------------------ 10M: one process


def case_small(size: str, steps: int, warmup: int, root: Path) -> dict:
    import torch

    from tunesmith.models import load_model_and_tokenizer

    ws = common.make_workspace(root, size)
    model, tok = load_model_and_tokenizer(ws.model_dir)
    batch, max_length = ws.size.batch_size, ws.size.max_length
    pairs = make_pairs(tok, ws.records, max_length)[:batch * steps]
    tokens = sum(min(len(p["prompt_ids"]) + len(p[k]), max_length) for p in pairs for k in ("chosen_ids",
                                                                                           "rejected_ids"))
    print(f"10M case: model {ws.n_params / 1e6:.1f}M params, {len(pairs)} pairs ({tokens / len(pairs):.0f} tokens a "
          f"pair), batch {batch} pairs, max_length {max_length}; {common.threads_note()}", flush=True)
    steppers = {}
    with tempfile.TemporaryDirectory() as tmp, common.quiet(root / "libraries.log"):
        for name in CONTENDERS:
            torch.manual_seed(0)
            trainer, batches = build_trainer(name, copy.deepcopy(model), tok, pairs, batch, max_length,
                                             f"{tmp}/{name}")
            steppers[name] = stepper(trainer, batches)
        times = {name: [] for name in CONTENDERS}
        for i in range(steps):
            order = list(CONTENDERS[i % 3:] + CONTENDERS[:i % 3])  # rotate who goes first
            for name in order:
                times[name].append(steppers[name](i))
    timed = {name: t[warmup:] for name, t in times.items()}
    result = {"ms": {name: 1000 * statistics.median(t) for name, t in timed.items()}}
    for peer in ("trl", "trl-precompute"):
        result[f"ratio_{peer}"] = statistics.median(a / b for a, b in zip(timed["tunesmith"], timed[peer]))
    return result


# ------------------------------------------------------------------------------------------------ 152k: subprocesses


def big_workspace(root: Path, quick: bool) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    ws = common.make_workspace(root, "quick")  # its tokenizer (ids below 512) serves the big model too
    model_dir = root / "model-152k"
    if not (model_dir / "model.safetensors").exists():
        import shutil

        shutil.copytree(ws.model_dir, model_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors",
                                                                                                  "config.json"))
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=VOCAB_BIG, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                          bos_token_id=0, eos_token_id=1, tie_word_embeddings=True)
        LlamaForCausalLM(cfg).save_pretrained(model_dir, safe_serialization=True)
    rng = random.Random(3)
    lexicon = common._lexicon(random.Random(1234))
    n_words = 120 if quick else 900
    records = [{"prompt": "Write: " + common._sentence(rng, lexicon, 30),
                "completion": common._sentence(rng, lexicon, n_words)} for _ in range(24)]
    (root / "big.json").write_text(json.dumps(records))
    return {"model": str(model_dir), "records": str(root / "big.json"), "max_length": 256 if quick else 1024}


def child(a) -> dict:
    """One contender at the large vocabulary: its step times and this process's peak RSS."""
    import torch

    from tunesmith.models import load_model_and_tokenizer

    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(a.model)
    pairs = make_pairs(tok, json.loads(Path(a.records).read_text()), a.max_length)
    with tempfile.TemporaryDirectory() as tmp, common.quiet(Path(tmp) / "libraries.log"):
        trainer, batches = build_trainer(a.child, model, tok, pairs, a.batch, a.max_length, tmp)
        step = stepper(trainer, batches)
        before = common._status_kb("VmRSS") / 1024
        times = [step(i) for i in range(a.steps)]
    return {"ms": 1000 * statistics.median(times[a.warmup:]), "peak_mib": common._status_kb("VmHWM") / 1024,
            "before_steps_mib": before,
            "tokens_per_row": statistics.mean(int(m.sum()) for b in batches for m in b["attention_mask"])}


def case_big(quick: bool, steps: int, warmup: int, root: Path) -> dict:
    ws = big_workspace(root, quick)
    print(f"\n152k case: vocabulary {VOCAB_BIG:,}, rows up to {ws['max_length']} tokens, batch 2 pairs (4 rows); "
          "each contender in its own process", flush=True)
    out = {}
    for name in CONTENDERS:
        cmd = [sys.executable, __file__, "--child", name, "--model", ws["model"], "--records", ws["records"],
               "--max-length", str(ws["max_length"]), "--batch", "2", "--steps", str(steps), "--warmup",
               str(warmup)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"{name} failed:\n{p.stderr[-3000:]}")
        out[name] = json.loads(p.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--only", choices=["10M", "152k"])
    ap.add_argument("--child", choices=CONTENDERS)
    ap.add_argument("--model")
    ap.add_argument("--records")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a)))
        return
    steps = a.steps or (5 if a.quick else 12)
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:  # workspaces are removed at the end
        report(a, steps, Path(tmp))


def report(a, steps: int, root: Path) -> None:
    if a.only != "152k":
        small = case_small("quick" if a.quick else "full", steps, a.warmup, root / "10M")
        print("training step (median of the timed steps, interleaved):")
        for name in CONTENDERS:
            print(f"  {LABELS[name]:<44} {small['ms'][name]:8.1f} ms")
        print(f"  tunesmith / TRL (reference copy)        {small['ratio_trl']:5.2f}x   (target <= 0.7x)")
        print(f"  tunesmith / TRL (precompute)            {small['ratio_trl-precompute']:5.2f}x")
    if a.only != "10M":
        big = case_big(a.quick, max(3, steps // 2), min(a.warmup, 1), root / "152k")
        for name in CONTENDERS:
            print(f"  {LABELS[name]:<44} {big[name]['ms']:8.1f} ms/step   peak RSS {big[name]['peak_mib']:7.0f} MiB"
                  f" (before the steps {big[name]['before_steps_mib']:5.0f})   {big[name]['tokens_per_row']:.0f} "
                  "tokens a row")
        for peer in ("trl", "trl-precompute"):
            print(f"  tunesmith / {LABELS[peer]:<38} step {big['tunesmith']['ms'] / big[peer]['ms']:5.2f}x   "
                  f"peak RSS {big['tunesmith']['peak_mib'] / big[peer]['peak_mib']:5.2f}x"
                  + ("   (targets <= 0.7x, <= 0.5x)" if peer == "trl" else ""))


if __name__ == "__main__":
    main()
