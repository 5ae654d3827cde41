#!/usr/bin/env python
"""Pretrain the demo's tiny base model from scratch on the synthetic world's corpus (CPU, reproducible from a seed).

    python scripts/pretrain_demo_base.py        # writes src/tunesmith/demo/base_model/ (~12-28 min on 2 CPUs)

Steps: build the world (tunesmith.demo.world) and its corpus; train a byte-level BPE tokenizer with dedicated
<|bos|>, <|eos|> and <|pad|> tokens; train a small Llama (tied embeddings, float32) with AdamW and a cosine schedule
on packed documents; run the knowledge probe; save safetensors + tokenizer + provenance + sha256 manifest. The output
directory is written next to the target and renamed into place only when complete.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "src" / "tunesmith" / "demo" / "base_model"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0, help="training seed (init, data order)")
    ap.add_argument("--world-seed", type=int, default=0)
    ap.add_argument("--n-people", type=int, default=240)
    ap.add_argument("--vocab-size", type=int, default=3072)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=704)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: bit-reproducible; on a busy 2-core machine also faster than 2)")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--probe-every", type=int, default=200, help="probe a subset of people every N steps (0: never)")
    return ap.parse_args(argv)


def train_tokenizer(texts, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|pad|>", "<|bos|>", "<|eos|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<|bos|>")
    # Like Llama: the tokenizer puts BOS in front of every text; EOS is added by whoever builds training examples.
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                                       special_tokens=[("<|bos|>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", model_max_length=512)


def packed_batches(token_docs, seq_len, batch_size, rng):
    """Endless batches of ``seq_len`` tokens cut from the documents concatenated in a fresh random order each pass."""
    import torch

    buf: list[int] = []
    while True:
        order = list(range(len(token_docs)))
        rng.shuffle(order)
        for i in order:
            buf.extend(token_docs[i])
            while len(buf) >= seq_len * batch_size:
                block, buf = buf[:seq_len * batch_size], buf[seq_len * batch_size:]
                yield torch.tensor(block, dtype=torch.long).view(batch_size, seq_len)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO / "src"))
    from tunesmith.demo.base import knowledge_probe, write_manifest
    from tunesmith.demo.world import World
    from tunesmith.io import atomic_write_json, atomic_write_text

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    t0 = time.time()

    world = World(seed=args.world_seed, n_people=args.n_people)
    train_rows, held_rows = world.instruction_data()
    # Enough fresh descriptions that training rarely sees the same paragraph twice.
    tokens_needed = args.steps * args.batch_size * args.seq_len
    docs_per_person = max(20, math.ceil(tokens_needed / 50 / len(world.people)))
    corpus = world.corpus(docs_per_person=docs_per_person)
    tok_texts = corpus[: 200 * len(world.people) // 10] + [r["instruction"] + "\n" + r["output"]
                                                          for r in train_rows + held_rows]
    tokenizer = train_tokenizer(tok_texts, args.vocab_size)
    eos = tokenizer.eos_token_id
    token_docs = [ids + [eos] for ids in tokenizer(corpus)["input_ids"]]  # each starts with BOS
    n_tokens = sum(map(len, token_docs))
    print(f"world: {len(world.people)} people; corpus {len(corpus)} docs, {n_tokens} tokens; vocab {len(tokenizer)}; "
          f"prep {time.time() - t0:.1f}s", flush=True)

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    batches = packed_batches(token_docs, args.seq_len, args.batch_size, random.Random(args.seed))
    probe_rng = random.Random(args.seed)
    probe_people = probe_rng.sample(world.people, min(40, len(world.people)))
    t_train = time.time()
    losses, history = [], []
    model.train()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x = next(batches)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0:
            el = time.time() - t_train
            avg = sum(losses[-args.log_every:]) / args.log_every
            print(f"step {step + 1}/{args.steps} loss {avg:.4f} lr {lr_at(step):.2e} "
                  f"{(step + 1) * x.numel() / el:.0f} tok/s {el:.0f}s", flush=True)
            history.append({"step": step + 1, "loss": round(avg, 4), "elapsed_s": round(el, 1)})
        if args.probe_every and (step + 1) % args.probe_every == 0 and step + 1 < args.steps:
            model.eval()
            r = knowledge_probe(model, tokenizer, world, probe_people)
            model.train()
            print(f"  probe@{step + 1} (40 people): {r['overall']:.3f} "
                  + " ".join(f"{a}={v:.2f}" for a, v in r["per_attribute"].items()), flush=True)
    train_time = time.time() - t_train
    final_loss = sum(losses[-args.log_every:]) / min(len(losses), args.log_every)

    model.eval()
    t_probe = time.time()
    probe = knowledge_probe(model, tokenizer, world)
    held_probe = knowledge_probe(model, tokenizer, world, world.heldout_people)
    print(f"probe (all {len(world.people)} people): {probe['overall']:.4f} "
          + " ".join(f"{a}={v:.3f}" for a, v in probe["per_attribute"].items())
          + f"; held-out people {held_probe['overall']:.4f}; {time.time() - t_probe:.0f}s", flush=True)

    out = args.output
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    total_time = time.time() - t0
    info = {
        "script": "scripts/pretrain_demo_base.py",
        "command": "python scripts/pretrain_demo_base.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "seed": args.seed,
        "world": {"seed": args.world_seed, "n_people": args.n_people, "docs_per_person": docs_per_person,
                  "corpus_docs": len(corpus), "corpus_tokens": n_tokens},
        "model": {"parameters": n_params, "hidden": args.hidden, "layers": args.layers, "heads": args.heads,
                  "intermediate": args.intermediate, "vocab": len(tokenizer), "tied_embeddings": True},
        "training": {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                     "tokens_seen": args.steps * args.batch_size * args.seq_len, "lr": args.lr,
                     "warmup": args.warmup, "weight_decay": args.weight_decay, "optimizer": "AdamW(0.9, 0.95)",
                     "schedule": "linear warmup, cosine to 10%", "final_loss": round(final_loss, 4),
                     "loss_history": history},
        "time": {"train_s": round(train_time, 1), "total_s": round(total_time, 1), "threads": args.threads,
                 "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                 "torch": torch.__version__},
        "probe": {"overall": round(probe["overall"], 4),
                  "per_attribute": {a: round(v, 4) for a, v in probe["per_attribute"].items()},
                  "n": probe["n"], "heldout_people_overall": round(held_probe["overall"], 4)},
    }
    atomic_write_json(tmp / "provenance.json", info)
    per = "\n".join(f"| {a} | {v:.3f} |" for a, v in info["probe"]["per_attribute"].items())
    atomic_write_text(tmp / "PROVENANCE.md", f"""# tunesmith demo base model

A {n_params / 1e6:.2f}M-parameter Llama (hidden {args.hidden}, {args.layers} layers, {args.heads} heads, tied
embeddings, float32) with a {len(tokenizer)}-token byte-level BPE tokenizer (`<|bos|>`, `<|eos|>`, dedicated
`<|pad|>`), pretrained from scratch on the synthetic world of `tunesmith.demo.world` (world seed {args.world_seed},
{args.n_people} people, {len(corpus)} documents, {n_tokens} tokens).

- Reproduce: `{info['command'].strip()}` (training seed {args.seed}, {args.threads} thread(s))
- Training: {args.steps} steps x {args.batch_size} x {args.seq_len} tokens, AdamW lr {args.lr}, cosine schedule;
  final training loss {final_loss:.4f}
- Time on this machine ({info['time']['machine']}): {train_time / 60:.1f} min training, {total_time / 60:.1f} min total
- Knowledge probe (greedy completion, e.g. "<name> was born in the city of"), all {len(world.people)} people:
  **{probe['overall']:.3f}** overall; held-out people only: {held_probe['overall']:.3f}

| attribute | probe accuracy |
|---|---|
{per}

`SHA256SUMS.txt` lists the sha256 (`sha256sum -c SHA256SUMS.txt`) of every file here; `tunesmith.demo.base.verify`
checks it before loading.
""")
    write_manifest(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"saved {out} ({size / 1e6:.1f} MB) in {total_time / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
