"""Data and memory at scale (issue 12): data preparation + packing at 10k / 100k / 1M examples, the second run's
speed-up from the cache, and the peak RSS of an SFT step and of `tunesmith eval` at a 152,064-entry vocabulary and
1,024 tokens — each against a peer measured in the same run (TRL's SFTTrainer; tunesmith before this work).

Every measurement is its own subprocess under ``/usr/bin/time -f "%e %M"`` (wall seconds, peak RSS), so each peak
is that process's alone. The child also reports the time of the step itself (preparation, packing) on its own clock.

    OMP_NUM_THREADS=1 python bench/bench_scale.py                    # everything (the 1M case takes minutes)
    OMP_NUM_THREADS=1 python bench/bench_scale.py --sizes 10000 --skip-memory   # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402  (offline environment, src on the path)

VOCAB_BIG = 152_064
BEFORE = "2d29bd5"  # tunesmith before this work (the branch point of issue 12)


# --- workspace ------------------------------------------------------------------------------------------------------

def alpaca_records(n: int, seed: int = 0):
    """Synthetic Alpaca-like records: instruction, input for a third of them, output; Zipf-distributed words."""
    rng = random.Random(seed)
    lexicon = common._lexicon(random.Random(1234))
    for _ in range(n):
        instruction = f"{rng.choice(common._TASKS)}: {common._sentence(rng, lexicon, rng.randint(4, 40))}"
        inp = common._sentence(rng, lexicon, rng.randint(5, 60)) if rng.random() < 1 / 3 else ""
        n_out = rng.choice([rng.randint(3, 20), rng.randint(20, 80), rng.randint(60, 200)])
        yield {"instruction": instruction, "input": inp, "output": common._sentence(rng, lexicon, n_out)}


def write_jsonl(path: Path, rows) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    tmp.rename(path)


def workspace(root: Path, sizes: list[int]) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    biggest = root / f"alpaca-{max(sizes)}.jsonl"
    if not biggest.exists():
        t = time.time()
        write_jsonl(biggest, alpaca_records(max(sizes)))
        print(f"wrote {biggest} in {time.time() - t:.0f} s", flush=True)
    files = {}
    for n in sizes:  # prefixes of the biggest file
        path = root / f"alpaca-{n}.jsonl"
        if not path.exists():
            with open(biggest, encoding="utf-8") as src, open(path.with_suffix(".tmp"), "w", encoding="utf-8") as dst:
                for _, line in zip(range(n), src):
                    dst.write(line)
            path.with_suffix(".tmp").rename(path)
        files[n] = path
        trl_path = root / f"trl-{n}.jsonl"  # the same examples as TRL prompt/completion (alpaca template as text)
        if not trl_path.exists():
            from tunesmith.data.templates import ALPACA_NO_INPUT, ALPACA_WITH_INPUT

            def rendered(rows):
                for r in rows:
                    fmt = ALPACA_WITH_INPUT if r["input"] else ALPACA_NO_INPUT
                    head = fmt[:fmt.index("{response}")]
                    yield {"prompt": head.replace("{input}", r["input"]).replace("{prompt}", r["instruction"]),
                           "completion": r["output"]}

            write_jsonl(trl_path, rendered(json.loads(line) for line in open(path, encoding="utf-8")))
    tok_dir = root / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        sample = [{"prompt": r["instruction"] + " " + r["input"], "completion": r["output"]}
                  for r in alpaca_records(20_000, seed=7)]
        sample += [{"prompt": common.render_for_trl({"prompt": "x", "completion": ""})["prompt"],
                    "completion": "Below is an instruction that describes a task"}] * 50
        common.build_tokenizer(tok_dir, sample, 8192)
    small_model = root / "model-small"  # TRL's SFTTrainer needs a model to prepare data
    if not (small_model / "model.safetensors").exists():
        import shutil

        shutil.copytree(tok_dir, small_model, dirs_exist_ok=True)
        common.build_model(small_model, 8192, common.SIZES["quick"])
    return {"files": files, "tokenizer": str(tok_dir), "small_model": str(small_model)}


def big_workspace(root: Path) -> dict:
    """A tiny Llama with a 152,064-entry vocabulary (tied embeddings), and long examples: batch 4 x 1,024 tokens."""
    model = root / "model-152k"
    if not (model / "model.safetensors").exists():
        import shutil

        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        from tunesmith.data.templates import get_template, save_template

        shutil.copytree(root / "tokenizer", model, dirs_exist_ok=True)
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=VOCAB_BIG, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                          bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=True)
        LlamaForCausalLM(cfg).save_pretrained(model, safe_serialization=True)
        from transformers import AutoTokenizer

        save_template(get_template("alpaca", AutoTokenizer.from_pretrained(model)), model)
    data = root / "long.jsonl"
    if not data.exists():
        rng = random.Random(3)
        lexicon = common._lexicon(random.Random(1234))
        rows = [{"instruction": "Write: " + common._sentence(rng, lexicon, 30), "input": "",
                 "output": common._sentence(rng, lexicon, 900)} for _ in range(16)]
        write_jsonl(data, rows)
        from tunesmith.data.templates import ALPACA_NO_INPUT

        head = ALPACA_NO_INPUT[:ALPACA_NO_INPUT.index("{response}")]
        write_jsonl(root / "long-trl.jsonl", ({"prompt": head.replace("{prompt}", r["instruction"]),
                                               "completion": r["output"]} for r in rows))
    return {"model": str(model), "data": str(data), "trl_data": str(root / "long-trl.jsonl")}


# --- children: one measurement each ---------------------------------------------------------------------------------

def child_prep(a) -> dict:
    """The SFT route: the data entry (resolve the source once, stream into Arrow, tokenize, cache) then packing.
    Falls back to ``prepare_dataset`` for a tunesmith from before the entry (``--peer``)."""
    from transformers import AutoTokenizer

    from tunesmith.data.collate import pack
    from tunesmith.data.templates import get_template

    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    t0 = time.perf_counter()
    try:
        from tunesmith.data.source import open_sources, tokenize_sources
    except ImportError:  # tunesmith before the data entry
        from tunesmith.data.prepare import prepare_dataset

        data, summary = prepare_dataset(a.data, tok, get_template("alpaca"), a.max_length, num_proc=a.num_proc,
                                        cache_dir=a.cache)
    else:
        data, summary = tokenize_sources(open_sources(a.data, cache_dir=a.cache), tok, get_template("alpaca"),
                                         a.max_length, num_proc=a.num_proc, cache_dir=a.cache)
        summary = summary.parts[0]
    t1 = time.perf_counter()
    rows = pack(data, a.max_length)
    t2 = time.perf_counter()
    return {"prepare_s": t1 - t0, "pack_s": t2 - t1, "examples": summary.examples, "kept": summary.kept,
            "rows": len(rows), "fill": rows.fill, "tokens": summary.tokens}


def child_prep_before(a) -> dict:
    """tunesmith before this work (PYTHONPATH points at its source)."""
    from transformers import AutoTokenizer

    from tunesmith.data.collate import pack
    from tunesmith.data.prepare import load_examples, tokenize_examples
    from tunesmith.data.templates import get_template

    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    t0 = time.perf_counter()
    data, summary = tokenize_examples(load_examples(a.data), tok, get_template("alpaca"), a.max_length)
    t1 = time.perf_counter()
    rows = pack(data, a.max_length)
    t2 = time.perf_counter()
    tokens = sum(len(e["input_ids"]) for e in data)
    return {"prepare_s": t1 - t0, "pack_s": t2 - t1, "examples": summary.examples, "kept": summary.kept,
            "rows": len(rows), "fill": tokens / (len(rows) * a.max_length), "tokens": tokens}


def child_prep_trl(a) -> dict:
    """TRL's SFTTrainer preparing the same examples (prompt/completion, completion-only loss, BFD packing)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    model = AutoModelForCausalLM.from_pretrained(a.model)
    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=a.data, split="train", cache_dir=a.cache)
    cfg = SFTConfig(output_dir=os.path.join(a.cache, "out"), max_length=a.max_length, packing=True,
                    completion_only_loss=True, dataset_num_proc=a.num_proc, use_cpu=True, report_to="none",
                    save_strategy="no", max_steps=1)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
    t1 = time.perf_counter()
    rows = trainer.train_dataset
    lengths = rows["seq_lengths"] if "seq_lengths" in rows.column_names else None
    tokens = sum(sum(x) for x in lengths) if lengths is not None else None
    return {"prepare_s": t1 - t0, "pack_s": None, "examples": len(ds), "rows": len(rows),
            "fill": tokens / (len(rows) * a.max_length) if tokens else None, "tokens": tokens}


def _sft_config(big: dict, out: str, **over) -> dict:
    cfg = dict(model_name_or_path=big["model"], dataset=big["data"], output_dir=out, template="alpaca",
               max_length=1024, per_device_train_batch_size=4, max_steps=2, learning_rate=1e-4, logging_steps=1,
               save_strategy="no", report_to="none", seed=0, use_cpu=True, train_loss_eval_samples=0,
               disable_tqdm=True, dataloader_num_workers=0)
    cfg.update(over)
    return cfg


def child_sft(a) -> dict:
    from tunesmith.recipes import sft

    t0 = time.perf_counter()
    sft.train(_sft_config(json.loads(a.big), a.out))
    return {"run_s": time.perf_counter() - t0}


def child_first_step(a) -> dict:
    """`tunesmith sft` on the 100k file, one optimizer step: the time to the first step (data prepared or cached)."""
    from tunesmith.recipes import sft

    t0 = time.perf_counter()
    sft.train({**_sft_config({"model": a.model, "data": a.data}, a.out), "max_steps": 1,
               "per_device_train_batch_size": 8, "dataset_format": "alpaca"})
    return {"run_s": time.perf_counter() - t0}


def child_sft_trl(a) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    big = json.loads(a.big)
    tok = AutoTokenizer.from_pretrained(big["model"])
    model = AutoModelForCausalLM.from_pretrained(big["model"], dtype=torch.float32)
    ds = datasets.load_dataset("json", data_files=big["trl_data"], split="train", cache_dir=a.cache)
    cfg = SFTConfig(output_dir=a.out, max_length=1024, per_device_train_batch_size=4, max_steps=2,
                    learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to="none", seed=0, use_cpu=True,
                    completion_only_loss=True, packing=False, padding_free=False, disable_tqdm=True,
                    dataloader_num_workers=0, gradient_checkpointing=False)
    t0 = time.perf_counter()
    SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok).train()
    return {"run_s": time.perf_counter() - t0}


def child_sft_lean_loop(a) -> dict:
    """Two AdamW steps of a plain PyTorch loop on tunesmith's batches with tunesmith's lean loss."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.data.collate import Collator
    from tunesmith.data.prepare import tokenize_examples
    from tunesmith.data.source import read_examples
    from tunesmith.data.templates import get_template
    from tunesmith.scoring import causal_lm_loss

    big = json.loads(a.big)
    tok = AutoTokenizer.from_pretrained(big["model"])
    model = AutoModelForCausalLM.from_pretrained(big["model"], dtype=torch.float32)
    rows, _ = tokenize_examples(read_examples(big["data"]), tok, get_template("alpaca"), 1024)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t0 = time.perf_counter()
    for step in range(2):
        batch = Collator(tok.pad_token_id)(rows[4 * step:4 * step + 4])
        causal_lm_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    return {"run_s": time.perf_counter() - t0, "tokens_per_batch": int(batch["input_ids"].numel())}


def child_eval(a) -> dict:
    from tunesmith.cli import main

    big = json.loads(a.big)
    t0 = time.perf_counter()
    rc = main(["eval", "--model", big["model"], "--dataset", big["data"], "--output", os.path.join(a.out, "e.json"),
               "--max_length", "1024", "--batch_size", str(a.batch_size)])
    loss = json.load(open(os.path.join(a.out, "e.json")))["loss"][big["data"]]
    return {"run_s": time.perf_counter() - t0, "rc": rc, "loss": loss["loss"], "tokens": loss["tokens"]}


def child_spin_data(a) -> dict:
    """SPIN's data phase without a model: the prompt table (tokenized, cached), two iterations of generation shards
    (synthetic answers: each real answer's first half, written by the shard writer SPIN uses), the pairs of iteration 1
    (its answers and iteration 0's: 2 x N pairs) assembled, the generation counts, and one pass over every pair through
    the pair collator in batches of 32, as the reference stage reads them."""
    from transformers import AutoTokenizer

    from tunesmith.data.source import open_sources
    from tunesmith.data.templates import get_template
    from tunesmith.models import ensure_pad_token
    from tunesmith.preference.pairs import PairCollator, n_shards, shard_path, write_shard
    from tunesmith.recipes.spin.data import assemble_pairs, generation_metrics, prepare_prompts, read_generations

    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    ensure_pad_token(tok)
    t0 = time.perf_counter()
    sources = open_sources(a.data, cache_dir=a.cache)
    prompts, _, _, _ = prepare_prompts(sources, tok, get_template("alpaca"), a.max_length, num_proc=a.num_proc,
                                       cache_dir=a.cache)
    t1 = time.perf_counter()
    size, out = 256, Path(a.out)
    for t in (0, 1):
        for k in range(n_shards(len(prompts), size)):
            rows = prompts[k * size:(k + 1) * size]
            ids = [r[:max(1, len(r) // 2)] for r in rows["real_ids"]]
            write_shard(shard_path(out / f"iteration-{t}", k), {
                "index": list(range(k * size, k * size + len(ids))), "ids": ids, "text": [""] * len(ids),
                "truncated": [False] * len(ids), "seconds": [0.0] * len(ids)})
    t2 = time.perf_counter()
    gens = [read_generations(out / f"iteration-{t}", len(prompts), size) for t in (1, 0)]
    counts = generation_metrics(prompts, gens[0])
    pairs = assemble_pairs(prompts, gens)
    collate, tokens = PairCollator(tok.pad_token_id, a.max_length), 0
    for start in range(0, len(pairs), 32):
        cols = pairs[start:start + 32]
        batch = collate([dict(zip(cols, values)) for values in zip(*cols.values())])
        tokens += int(batch["attention_mask"].sum())
    t3 = time.perf_counter()
    return {"prompts": len(prompts), "pairs": len(pairs), "prepare_s": t1 - t0, "shards_s": t2 - t1,
            "assemble_s": t3 - t2, "tokens": tokens, "identical": counts["identical"]}


CHILDREN = {"prep": child_prep, "spin-data": child_spin_data, "prep-before": child_prep_before,
            "prep-trl": child_prep_trl, "sft": child_sft, "sft-trl": child_sft_trl, "first-step": child_first_step,
            "sft-lean-loop": child_sft_lean_loop, "eval": child_eval}


# --- parent ---------------------------------------------------------------------------------------------------------

def measure(label: str, kind: str, src: Path, log: Path, env: dict | None = None, **kw) -> dict:
    """Run one child under /usr/bin/time; returns its JSON result + wall_s and peak_mib of the whole process."""
    args = [sys.executable, str(Path(__file__).resolve()), "--child", kind]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), **(env or {}))
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n=== {label}: {' '.join(args)}\n")
    proc = subprocess.run(["/usr/bin/time", "-f", "TIME %e %M %U %S"] + args, env=env, capture_output=True,
                          text=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write(proc.stdout[-5000:] + proc.stderr[-5000:])
    timing = [line for line in proc.stderr.splitlines() if line.startswith("TIME ")]
    if proc.returncode or not timing:
        raise SystemExit(f"{label} failed (exit {proc.returncode}); see {log}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    wall, kb, user, system = timing[-1].split()[1:]
    result.update(wall_s=float(wall), peak_mib=int(kb) / 1024, cpu_s=float(user) + float(system))
    print(f"  {label:52s} wall {result['wall_s']:7.1f} s  CPU {result['cpu_s']:7.1f} s  peak RSS "
          f"{result['peak_mib']:7.0f} MiB", flush=True)
    return result


def before_source(root: Path, commit: str = BEFORE) -> Path:
    """tunesmith's source at ``commit`` (default BEFORE), extracted from git (the peer 'before this work')."""
    dest = root / f"before-{commit}"
    if not (dest / "src" / "tunesmith").exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(HERE.parent), "archive", commit, "src"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "src"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/tunesmith-bench-scale")
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--trl-sizes", default="10000,100000", help="sizes at which TRL prepares the data too")
    p.add_argument("--before-sizes", default="10000", help="sizes at which tunesmith before this work runs")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--num-proc", type=int, default=1)
    p.add_argument("--skip-data", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--spin-sizes", default="10000,200000", help="prompts at which SPIN's data phase runs (prefixes of "
                                                                "the same generated file; empty: skip)")
    p.add_argument("--peer", default="", help="a commit whose data preparation (the same 'prep' child) is measured "
                                              "beside this tree's at --peer-sizes (e.g. the commit before a change)")
    p.add_argument("--peer-sizes", default="10000,100000")
    p.add_argument("--before-eval-batch", type=int, default=1,
                   help="batch size of the 'before' eval peer (8 needs ~15 GiB)")
    # child arguments
    p.add_argument("--child", choices=sorted(CHILDREN))
    for name in ("data", "tokenizer", "model", "cache", "out", "big"):
        p.add_argument(f"--{name}")
    p.add_argument("--batch-size", type=int, default=8)
    a = p.parse_args()
    if a.child:
        print(json.dumps(CHILDREN[a.child](a)))
        return

    root = Path(a.workdir)
    log = root / "bench_scale.log"
    src = HERE.parent / "src"
    sizes = [int(x) for x in a.sizes.split(",") if x]
    trl_sizes = {int(x) for x in a.trl_sizes.split(",") if x}
    before_sizes = {int(x) for x in a.before_sizes.split(",") if x}
    print(common.threads_note(), flush=True)
    spin_sizes = [int(x) for x in a.spin_sizes.split(",") if x]
    ws = workspace(root, sorted(set(sizes) | set(spin_sizes)))
    results: dict = {"data": {}, "memory": {}, "spin": {}}
    if spin_sizes:
        import shutil

        print(f"\nSPIN's data phase: prompt table, 2 iterations of generation shards, 2 x N pairs assembled and "
              f"collated (max_length {a.max_length})")
        for n in spin_sizes:
            work = root / f"spin-{n}"
            shutil.rmtree(work, ignore_errors=True)
            results["spin"][n] = measure(f"tunesmith SPIN data {n:>9,} prompts", "spin-data", src, log,
                                         data=ws["files"][n], tokenizer=ws["tokenizer"], max_length=a.max_length,
                                         num_proc=a.num_proc, cache=work / "cache", out=work / "shards")
            shutil.rmtree(work, ignore_errors=True)

    if not a.skip_data:
        import shutil

        print(f"\ndata preparation + packing (alpaca template, max_length {a.max_length}, num_proc {a.num_proc})")
        for n in sizes:
            cache = root / f"cache-{n}"
            shutil.rmtree(cache, ignore_errors=True)
            common_kw = dict(data=ws["files"][n], tokenizer=ws["tokenizer"], max_length=a.max_length,
                             num_proc=a.num_proc)
            r = {"cold": measure(f"tunesmith {n:>9,} cold cache", "prep", src, log, cache=cache, **common_kw),
                 "warm": measure(f"tunesmith {n:>9,} second run", "prep", src, log, cache=cache, **common_kw)}
            if n in trl_sizes:
                trl_cache = root / f"trl-cache-{n}"
                shutil.rmtree(trl_cache, ignore_errors=True)
                kw = dict(common_kw, data=root / f"trl-{n}.jsonl", model=ws["small_model"], cache=trl_cache)
                r["trl_cold"] = measure(f"TRL SFTTrainer {n:>9,} cold cache", "prep-trl", src, log, **kw)
                r["trl_warm"] = measure(f"TRL SFTTrainer {n:>9,} second run", "prep-trl", src, log, **kw)
            if a.peer and n in {int(x) for x in a.peer_sizes.split(",") if x}:
                shutil.rmtree(cache, ignore_errors=True)
                r["peer"] = measure(f"tunesmith at {a.peer} {n:>9,} cold cache", "prep", before_source(root, a.peer),
                                    log, cache=cache, **common_kw)
                r["peer_commit"] = a.peer
            if n in before_sizes:
                r["before"] = measure(f"tunesmith before ({BEFORE}) {n:>9,}", "prep-before", before_source(root),
                                      log, **common_kw)
            results["data"][n] = r
            shutil.rmtree(cache, ignore_errors=True)

    if not a.skip_memory:
        import shutil

        big = big_workspace(root)
        kw = dict(big=json.dumps(big))
        print(f"\npeak RSS at vocabulary {VOCAB_BIG:,}, 1,024 tokens (tiny Llama: hidden 64, 2 layers, tied)")
        out = root / "runs"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        m = results["memory"]
        m["sft"] = measure("tunesmith sft, 2 steps of 4 x 1,024", "sft", src, log, out=out / "sft", **kw)
        m["sft_trl"] = measure("TRL SFTTrainer, 2 steps of 4 x 1,024", "sft-trl", src, log, out=out / "trl",
                               cache=root / "trl-cache-long", **kw)
        m["sft_lean_loop"] = measure("plain loop + tunesmith lean loss, 2 steps", "sft-lean-loop", src, log, **kw)
        m["eval"] = measure("tunesmith eval, 16 x ~1,024 tokens, batch 8", "eval", src, log, out=out, batch_size=8,
                            **kw)
        if 100_000 in ws["files"]:
            cache = root / "first-step-datasets-cache"
            shutil.rmtree(cache, ignore_errors=True)
            first = dict(model=ws["small_model"], data=ws["files"][100_000], env={"HF_DATASETS_CACHE": str(cache)})
            m["first_step_cold"] = measure("tunesmith sft to first step, 100k, cold cache", "first-step", src, log,
                                           out=out / "first-cold", **first)
            m["first_step_warm"] = measure("tunesmith sft to first step, 100k, second run", "first-step", src, log,
                                           out=out / "first-warm", **first)
            shutil.rmtree(cache, ignore_errors=True)
        m["eval_before"] = measure(f"tunesmith eval before ({BEFORE}), batch {a.before_eval_batch}", "eval",
                                   before_source(root), log, out=out, batch_size=a.before_eval_batch, **kw)

    (root / "results.json").write_text(json.dumps(results, indent=1, default=str))
    report(results, sizes)


def report(results: dict, sizes: list[int]) -> None:
    spin = results.get("spin") or {}
    if spin:
        print("\n| SPIN prompts | pairs | prepare | shards (synthetic) | assemble + collate | per prompt (prepare + "
              "assemble) | peak RSS |")
        print("|---|---|---|---|---|---|---|")
        base = None
        for n, r in spin.items():
            per = 1e6 * (r["prepare_s"] + r["assemble_s"]) / n
            base = base or per
            print(f"| {n:,} | {r['pairs']:,} | {r['prepare_s']:.1f} s | {r['shards_s']:.1f} s "
                  f"| {r['assemble_s']:.1f} s | {per:.0f} µs ({per / base:.2f}x; target <= 1.3x) "
                  f"| {r['peak_mib']:.0f} MiB (target <= 1,536) |")
    data = results["data"]
    if data:
        print("\n| examples | tunesmith prepare | pack | per example | peak RSS | rows (fill) | second run: prepare "
              "(process) | speed-up: prepare (process) | TRL prepare+pack | TRL peak RSS | TRL second run: prepare "
              "(process) | TRL time / tunesmith time |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        base = None
        for n in sizes:
            r = data[n]
            c, w = r["cold"], r["warm"]
            per = 1e6 * (c["prepare_s"] + c["pack_s"]) / n
            base = base or per
            trl = r.get("trl_cold")
            tw = r.get("trl_warm")
            print(f"| {n:,} | {c['prepare_s']:.1f} s | {c['pack_s']:.2f} s | {per:.0f} µs ({per / base:.2f}x) | "
                  f"{c['peak_mib']:.0f} MiB | {c['rows']:,} ({c['fill']:.3f}) | {w['prepare_s']:.2f} s "
                  f"({w['wall_s']:.1f} s) | {c['prepare_s'] / w['prepare_s']:.0f}x "
                  f"({c['wall_s'] / w['wall_s']:.1f}x) | "
                  + (f"{trl['prepare_s']:.1f} s | {trl['peak_mib']:.0f} MiB | {tw['prepare_s']:.2f} s "
                     f"({tw['wall_s']:.1f} s) | {trl['prepare_s'] / (c['prepare_s'] + c['pack_s']):.2f}x |"
                     if trl else "– | – | – | – |"))
        for n in sizes:
            p = data[n].get("peer")
            if p:
                c = data[n]["cold"]
                per_now, per_peer = ((c["prepare_s"] + c["pack_s"]) / n, (p["prepare_s"] + p["pack_s"]) / n)
                print(f"peer {data[n]['peer_commit']} at {n:,}: prepare {p['prepare_s']:.1f} s, "
                      f"pack {p['pack_s']:.2f} s, process CPU {p['cpu_s']:.1f} s, peak RSS {p['peak_mib']:.0f} MiB, "
                      f"{p['rows']:,} rows; this tree: time {per_now / per_peer:.2f}x the peer's "
                      f"(process CPU {c['cpu_s'] / p['cpu_s']:.2f}x), RSS {c['peak_mib'] / p['peak_mib']:.2f}x, "
                      f"rows {'equal' if c['rows'] == p['rows'] else 'DIFFER'}")
        for n in sizes:
            b = data[n].get("before")
            if b:
                c = data[n]["cold"]
                print(f"before ({BEFORE}) at {n:,}: prepare {b['prepare_s']:.1f} s, pack {b['pack_s']:.2f} s, peak RSS "
                      f"{b['peak_mib']:.0f} MiB, {b['rows']:,} rows (fill {b['fill']:.3f}); now "
                      f"{(b['prepare_s'] + b['pack_s']) / (c['prepare_s'] + c['pack_s']):.2f}x faster, RSS "
                      f"{c['peak_mib'] / b['peak_mib']:.2f}x, rows {c['rows'] / b['rows']:.3f}x")
    m = results["memory"]
    if m:
        print("\n| run (vocabulary 152,064) | peak RSS | vs TRL |")
        print("|---|---|---|")
        trl = m["sft_trl"]["peak_mib"]
        for key, name in (("sft", "tunesmith sft step"), ("sft_lean_loop", "plain loop + lean loss"),
                          ("sft_trl", "TRL SFTTrainer step"), ("eval", "tunesmith eval (batch 8)"),
                          ("eval_before", "tunesmith eval before")):
            print(f"| {name} | {m[key]['peak_mib']:.0f} MiB | "
                  + (f"{m[key]['peak_mib'] / trl:.2f}x |" if key.startswith("sft") else "– |"))
        if "first_step_cold" in m:
            c, w = m["first_step_cold"]["wall_s"], m["first_step_warm"]["wall_s"]
            print(f"tunesmith sft to its first step on 100k examples: cold cache {c:.1f} s, second run {w:.1f} s "
                  f"({c / w:.1f}x faster)")
        if "eval" in m and "eval_before" in m:
            print(f"eval losses: now {m['eval']['loss']:.6f}, before {m['eval_before']['loss']:.6f}")


if __name__ == "__main__":
    main()
