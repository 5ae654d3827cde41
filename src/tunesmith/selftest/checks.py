"""The self-test's checks (issue 19), in order. Each is ``fn(ctx, record)`` (see :mod:`tunesmith.selftest.run`): it
trains or scores through tunesmith's public paths (``sft.train``, ``spin.train``, ``plan.plan``, ``scoring``, the
``tunesmith`` command under ``accelerate launch``), measures a peer the same way in the same process where one
applies (TRL's SFTTrainer, the model's own full logits, a raw ``model.generate``), and records figures and broken
expectations. Sizes come from :mod:`tunesmith.selftest.workspace` (the GPU form, or the tiny ``--quick`` form)."""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

from tunesmith.selftest import workspace
from tunesmith.selftest.measure import GiB, Peak, flops_per_token, free_memory, peak_tflops, step_timer
from tunesmith.selftest.run import Context, Record, Spec

NEFTUNE_ALPHA = 5.0
DISTRIBUTIONS = ("tunesmith", "torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "tokenizers",
                 "trl", "bitsandbytes", "flash-attn", "deepspeed", "vllm", "liger-kernel")


def _round(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def _gib(n: int | None):
    return None if n is None else _round(n / GiB, 3)


def _tolerance(ctx: Context) -> float:
    """Largest |difference| of two log-probabilities (nats) that one computation can show against another of the
    same numbers: float32 rounding on a CPU, 16-bit rounding (about 2e-3 measured on random models) on a GPU."""
    return 1e-3 if ctx.dtype == "float32" else 5e-2


# ------------------------------------------------------------------------------------------------ shared pieces


def small_model(ctx: Context) -> str:
    """The small model of checks 3-6, 8, 9 (bf16 on a GPU, float32 on a CPU)."""
    def make():
        path = ctx.work / "small-model"
        ctx.shared["small_params"] = workspace.build_model(path, ctx.sizes.small, ctx.dtype, ctx.device)
        return str(path)

    return ctx.once("small_model", make)


def small_data(ctx: Context) -> str:
    return ctx.once("small_data", lambda: workspace.write_jsonl(
        ctx.work / "small.jsonl", workspace.records(ctx.sizes.examples, (4, 12), (4, 24), seed=1)))


def small_values(ctx: Context, out: Path, **over) -> dict:
    """An SFT config (flat keys) on the small model and data: what a user's YAML file would hold."""
    values = dict(model_name_or_path=small_model(ctx), dataset=small_data(ctx), dataset_format="prompt_completion",
                  template="instruction_response", output_dir=str(out), max_length=96 if ctx.quick else 512,
                  per_device_train_batch_size=4, per_device_eval_batch_size=8, learning_rate=2e-3,
                  lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no",
                  report_to="none", train_loss_eval_samples=0, seed=0, disable_tqdm=True, dataloader_num_workers=0,
                  dtype="auto" if ctx.cuda else "float32", use_cpu=not ctx.cuda)
    values.update(over)
    return values


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def eval_losses(out: Path) -> list[float]:
    """The held-out losses a run logged to metrics.jsonl, in order (``eval_eval_loss``: the set named eval)."""
    return [row["eval_eval_loss"] for row in read_jsonl(out / "metrics.jsonl") if "eval_eval_loss" in row]


def reloaded_loss(ctx: Context, out: Path, values: dict, load_in_4bit: bool = False) -> tuple[float, int]:
    """(loss of the run's eval set under the model saved in ``out``, loaded afresh as a user would; its parameter
    count)."""
    from tunesmith.config import build_config
    from tunesmith.data.collate import Collator
    from tunesmith.models import load_model_and_tokenizer
    from tunesmith.recipes.sft import SFTConfig, prepare_data
    from tunesmith.scoring import rows_loss

    cfg = build_config(SFTConfig, dict(values), "selftest")
    model, tok = load_model_and_tokenizer(str(out), values["dtype"], load_in_4bit)
    if not load_in_4bit:
        model = model.to(ctx.device)
    _, _, _, eval_sets, _ = prepare_data(cfg, tok)  # held-out sets by name: one source is named "eval"
    loss = rows_loss(model, eval_sets["eval"], Collator(tok.pad_token_id), values["per_device_eval_batch_size"],
                     ctx.device)["loss"]
    n = sum(p.numel() for p in model.parameters())
    del model
    return loss, n


# ------------------------------------------------------------------------------------------------ 1. environment


def environment(ctx: Context, r: Record) -> None:
    import importlib.metadata as md
    import platform
    import time

    import torch
    from transformers.utils import import_utils

    import tunesmith

    f = r.figures
    f["date"] = time.strftime("%Y-%m-%d")
    if ctx.cuda:
        props = torch.cuda.get_device_properties(0)
        f["device"] = torch.cuda.get_device_name(0)
        f["gpus"] = torch.cuda.device_count()
        f["memory_gib"] = _round(props.total_memory / GiB, 3)
        f["compute_capability"] = f"{props.major}.{props.minor}"
        f["cuda"] = torch.version.cuda
        f["bf16"] = torch.cuda.is_bf16_supported()
        f["peak_bf16_tflops"] = peak_tflops(f["device"]) or "unknown (no MFU)"
    else:
        f["device"] = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
        f["bf16"] = "n/a on CPU"
    f["python"] = platform.python_version()
    for dist in DISTRIBUTIONS:
        try:
            f[dist] = tunesmith.__version__ if dist == "tunesmith" else md.version(dist)
        except md.PackageNotFoundError:
            f[dist] = "not installed"
    kernels = {"sdpa": hasattr(torch.nn.functional, "scaled_dot_product_attention"),
               "flex_attention": import_utils.is_torch_flex_attn_available(),
               "flash_attention_2": import_utils.is_flash_attn_2_available(),
               "flash_attention_3": getattr(import_utils, "is_flash_attn_3_available", lambda: False)()}
    f["attention"] = ", ".join(k for k, ok in kernels.items() if ok)
    r.expect(kernels["sdpa"], "torch has no scaled_dot_product_attention (torch too old)")
    if ctx.cuda:
        r.expect(torch.cuda.device_count() > 0, "torch sees no CUDA device")


# ------------------------------------------------------------------------------------------------ 2. SFT vs TRL


def _sft_model(ctx: Context) -> tuple[str, int]:
    def make():
        path = ctx.work / "sft-model"
        return str(path), workspace.build_model(path, ctx.sizes.sft, ctx.dtype, ctx.device)

    return ctx.once("sft_model", make)


def _sft_data(ctx: Context) -> tuple[str, list[dict]]:
    """Records whose completions are longer than the sequence: every row is exactly ``sft_seq`` tokens, padded by
    neither trainer."""
    s = ctx.sizes

    def make():
        rows = workspace.records((s.sft_warmup + s.sft_steps) * s.sft_batch, (4, 12), (s.sft_seq + 16, s.sft_seq + 64),
                                 seed=2)
        return workspace.write_jsonl(ctx.work / "sft.jsonl", rows), rows

    return ctx.once("sft_data", make)


def _throughput(r: Record, who: str, timer, warmup: int, params: int, arch, seq: int, peak) -> float:
    step = timer.median_step(warmup)
    tokens_per_step = timer.tokens / max(len(timer.seconds), 1)
    tps = tokens_per_step / step
    r.figures[f"{who}_step_s"] = _round(step)
    r.figures[f"{who}_tokens_per_s"] = _round(tps)
    if peak:
        flops = tps * flops_per_token(params, arch.layers, arch.hidden, seq)
        r.figures[f"{who}_mfu"] = _round(flops / (peak * 1e12), 3)
    return step


def sft_vs_trl(ctx: Context, r: Record) -> None:
    import importlib.util

    import torch

    from tunesmith.config import build_config
    from tunesmith.recipes.sft import SFTConfig, train

    s = ctx.sizes
    model_dir, params = _sft_model(ctx)
    data, rows = _sft_data(ctx)
    out = ctx.work / "sft-out"
    lr = 1e-3 if ctx.quick else 3e-4
    values = dict(model_name_or_path=model_dir, dataset=data, dataset_format="prompt_completion",
                  template="instruction_response", output_dir=str(out), max_length=s.sft_seq,
                  per_device_train_batch_size=s.sft_batch, max_steps=s.sft_warmup + s.sft_steps, learning_rate=lr,
                  lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no", report_to="none",
                  train_loss_eval_samples=0, seed=0, disable_tqdm=True, dataloader_num_workers=0,
                  dtype="auto" if ctx.cuda else "float32", use_cpu=not ctx.cuda)
    f = r.figures
    f["params_b"] = _round(params / 1e9, 4)
    f["vocab"], f["seq"], f["batch"] = s.sft.vocab, s.sft_seq, s.sft_batch
    f["timed_steps"] = s.sft_steps
    peak = peak_tflops(torch.cuda.get_device_name(0)) if ctx.cuda else None

    timer = step_timer()
    with Peak(ctx.device) as mem:
        train(build_config(SFTConfig, values, "selftest"), callbacks=[timer])
    shutil.rmtree(out, ignore_errors=True)
    ctx.shared["sft_values"], ctx.shared["sft_peak"] = values, mem.bytes
    ours = _throughput(r, "tunesmith", timer, s.sft_warmup, params, s.sft, s.sft_seq, peak)
    if mem.bytes:
        f["tunesmith_peak_gib"] = _gib(mem.bytes)
    f["tunesmith_loss"] = f"{timer.losses[0]:.3f} -> {timer.losses[-1]:.3f}" if timer.losses else "none logged"
    r.expect(len(timer.losses) >= 2 and timer.losses[-1] < timer.losses[0],
             f"tunesmith's training loss did not fall ({f['tunesmith_loss']})")
    r.expect(timer.tokens == (s.sft_warmup + s.sft_steps) * s.sft_batch * s.sft_seq,
             f"tunesmith saw {timer.tokens} tokens, expected full rows of {s.sft_seq}")
    free_memory()

    if importlib.util.find_spec("trl") is None:
        f["trl"] = "not installed: no peer ratios"
        return
    theirs, trl_mem, trl_timer = _run_trl(ctx, model_dir, rows, values, params, r, peak)
    f["step_time_ratio"] = _round(ours / theirs, 3)  # < 1: tunesmith's steps are faster
    if mem.bytes and trl_mem:
        f["peak_memory_ratio"] = _round(mem.bytes / trl_mem, 3)
    if trl_mem:
        f["trl_peak_gib"] = _gib(trl_mem)
    f["trl_loss"] = f"{trl_timer.losses[0]:.3f} -> {trl_timer.losses[-1]:.3f}" if trl_timer.losses else "none"


def _run_trl(ctx: Context, model_dir: str, rows: list[dict], values: dict, params: int, r: Record, peak):
    """TRL's SFTTrainer on the same model, text (tunesmith's template rendered as prompt / completion), batch size,
    sequence, steps and learning rate; gradient checkpointing off as in tunesmith (TRL's own default is on)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer

    s = ctx.sizes
    data = Dataset.from_list([{"prompt": f"### Instruction: {x['prompt']}\n\n### Response:",
                               "completion": " " + x["completion"]} for x in rows])
    args = TRLConfig(output_dir=str(ctx.work / "trl-out"), max_length=s.sft_seq,
                     per_device_train_batch_size=s.sft_batch, max_steps=values["max_steps"],
                     learning_rate=values["learning_rate"], lr_scheduler_type="constant",
                     warmup_steps=0, logging_steps=1, save_strategy="no", report_to="none", seed=0,
                     bf16=ctx.mixed_precision == "bf16", fp16=ctx.mixed_precision == "fp16", use_cpu=not ctx.cuda,
                     completion_only_loss=True, packing=False,
                     padding_free=False, gradient_checkpointing=False, include_num_input_tokens_seen="non_padding",
                     disable_tqdm=True, dataloader_num_workers=0)
    timer = step_timer()
    with Peak(ctx.device) as mem:
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, ctx.dtype))
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[timer])
        trainer.train()
    step = _throughput(r, "trl", timer, s.sft_warmup, params, s.sft, s.sft_seq, peak)
    del trainer, model
    shutil.rmtree(ctx.work / "trl-out", ignore_errors=True)
    return step, mem.bytes, timer


# ------------------------------------------------------------------------------------------------ 3. packing


def _random_examples(ctx: Context, n: int, lengths: tuple[int, int], seed: int = 3) -> list[dict]:
    rng = random.Random(seed)
    vocab = workspace.TOKENIZER_VOCAB
    out = []
    for _ in range(n):
        ids = [rng.randrange(3, vocab) for _ in range(rng.randint(*lengths))]
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def _to(batch: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _segments(batch: dict, examples: list[dict]) -> list[tuple[int, int, int]]:
    """(row, start, example index) of every example found in a packed / padding-free batch: segments start where
    ``position_ids`` restart at 0 and are matched to the examples by their tokens."""
    index = {tuple(ex["input_ids"]): i for i, ex in enumerate(examples)}
    out = []
    for k, (ids, pos) in enumerate(zip(batch["input_ids"].tolist(), batch["position_ids"].tolist())):
        starts = [t for t, p in enumerate(pos) if p == 0] + [len(pos)]
        for a, b in zip(starts, starts[1:]):
            i = index.get(tuple(ids[a:b]))
            if i is not None:
                out.append((k, a, i))
    return out


def packed_equals_unpacked(ctx: Context, r: Record, attn: str = "sdpa", padding_free: bool = False) -> None:
    """Per-token log-probs of packed rows at batch > 1 (or of one padding-free row) against the same examples in an
    ordinary padded batch, through tunesmith's collator and scoring. A control run of the packed rows with an
    all-ones attention mask (every token may attend to the examples before it in its row: the leak) shows the size
    of the difference a leak makes, so a pass cannot come from a check too blunt to see one."""
    import torch

    from tunesmith.data.collate import Collator, pack
    from tunesmith.models import load_model_and_tokenizer
    from tunesmith.scoring import token_logprobs

    if attn.startswith("flash") and ctx.dtype == "float32":
        r.skip("flash-attn needs 16-bit weights and this GPU has no bfloat16")
    s = ctx.sizes
    model, tok = load_model_and_tokenizer(small_model(ctx), ctx.dtype, attn_implementation=attn)
    model = model.to(ctx.device).eval()
    examples = _random_examples(ctx, s.pack_examples, s.pack_lengths)
    collate = Collator(tok.pad_token_id)
    if padding_free:
        batch = Collator(tok.pad_token_id, padding_free=True)(examples)
    else:
        batch = collate(list(pack(examples, s.pack_row)))
    found = _segments(batch, examples)
    r.expect(sorted(i for _, _, i in found) == list(range(len(examples))),
             "the packed batch does not hold every example exactly once")
    f = r.figures
    f["rows"] = f"{batch['input_ids'].shape[0]} x {batch['input_ids'].shape[1]}"
    f["examples"] = len(examples)
    if not padding_free:
        r.expect(batch["input_ids"].shape[0] > 1, "packing gave a single row: the check needs batch > 1")
    with torch.no_grad():
        packed, _ = token_logprobs(model, _to(batch, ctx.device))
        alone, _ = token_logprobs(model, _to(collate(examples), ctx.device))
        leaky = {k: v for k, v in batch.items() if k != "token_mask"}
        leaky["attention_mask"] = torch.ones_like(batch["input_ids"])
        leak, _ = token_logprobs(model, _to(leaky, ctx.device))
    worst = leak_worst = 0.0
    nll_packed = nll_alone = 0.0
    tokens = 0
    for k, start, i in found:
        n = len(examples[i]["input_ids"]) - 1  # predicted positions of the example
        a, b, c = packed[k, start:start + n].float(), alone[i, :n].float(), leak[k, start:start + n].float()
        worst = max(worst, (a - b).abs().max().item())
        leak_worst = max(leak_worst, (c - b).abs().max().item())
        nll_packed -= a.sum().item()
        nll_alone -= b.sum().item()
        tokens += n
    tol = _tolerance(ctx)
    f["tokens"] = tokens
    f["loss_packed"] = _round(nll_packed / tokens, 6)
    f["loss_unpacked"] = _round(nll_alone / tokens, 6)
    f["max_abs_dlogp"] = _round(worst, 3)
    f["leak_control_max_abs_dlogp"] = _round(leak_worst, 3)
    f["tolerance"] = tol
    r.expect(worst <= tol, f"{'padding-free' if padding_free else 'packed'} rows under {attn} differ from the same "
             f"examples unpacked: max |d log p| {worst:.3g} > {tol} (tokens attend across examples?)")
    r.expect(leak_worst > 4 * tol, f"inconclusive: a leak changes log-probs by only {leak_worst:.3g} here")


# ------------------------------------------------------------------------------------------------ 4. NEFTune


def neftune_bf16(ctx: Context, r: Record) -> None:
    """NEFTune through tunesmith's SFT path on a bf16 model: every training forward is noised with per-row maximum
    |noise| reaching alpha / sqrt(L_i * d) (L_i the row's own length; a padded-length scale would keep short rows
    well under it) and never above, exactly zero on padding; evaluation forwards are clean (tests/test_neftune.py's
    probe)."""
    import torch
    from transformers import TrainerCallback

    from tunesmith.recipes.sft import train
    from tunesmith.selftest.probes import NoiseProbe

    if ctx.cuda and not ctx.bf16:
        r.skip("this GPU has no bfloat16")
    out = ctx.work / "neftune-out"
    steps = ctx.sizes.neftune_steps
    values = small_values(ctx, out, dtype="bfloat16", neftune_noise_alpha=NEFTUNE_ALPHA, max_steps=steps,
                          train_loss_eval_samples=4, learning_rate=1e-4)

    class Watch(TrainerCallback):
        probe = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.probe = NoiseProbe(model)
            self.weight_max = model.get_input_embeddings().weight.detach().abs().max().float().item()

        def on_train_end(self, args, state, control, **kwargs):
            self.train_events = list(self.probe.events)
            self.probe.events.clear()

    watch = Watch()
    try:
        train(values, callbacks=[watch])
    finally:
        if watch.probe is not None:
            watch.probe.close()
    eval_events = list(watch.probe.events)
    shutil.rmtree(out, ignore_errors=True)
    eps = torch.finfo(torch.bfloat16).eps
    f = r.figures
    f["alpha"], f["dtype"] = NEFTUNE_ALPHA, "bfloat16"
    noised = [e for kind, e in watch.train_events if kind == "noised"]
    f["train_forwards_noised"] = f"{len(noised)}/{len(watch.train_events)}"
    r.expect(len(watch.train_events) == steps and len(noised) == steps,
             f"expected {steps} noised training forwards, saw {f['train_forwards_noised']}")
    ratios, padding_max, rows, short = [], 0.0, 0, 1.0
    for noise, mask in noised:
        if mask is None:
            continue
        d = noise.shape[-1]
        padding_max = max(padding_max, noise[mask == 0].abs().max().item() if (mask == 0).any() else 0.0)
        for i, n in enumerate(mask.sum(1).tolist()):
            bound = NEFTUNE_ALPHA / math.sqrt(n * d)
            slack = eps * (watch.weight_max + 2 * bound)
            m = noise[i, :n].abs().max().item()
            ratios.append(m / bound)
            rows += 1
            short = min(short, n / mask.shape[1])
            r.expect(0.9 * bound - slack <= m <= bound + slack,
                     f"row of {n} tokens: max |noise| {m:.4g} outside [0.9, 1] x alpha/sqrt(L d) = {bound:.4g}")
    f["rows_checked"] = rows
    f["max_noise_over_bound"] = f"{min(ratios):.3f} .. {max(ratios):.3f}" if ratios else "none"
    f["shortest_row_over_width"] = _round(short, 3)
    f["padding_max_noise"] = padding_max
    f["eval_forwards_clean"] = f"{sum(k == 'clean' for k, _ in eval_events)}/{len(eval_events)}"
    r.expect(rows > 0, "no padded training batch was seen")
    r.expect(padding_max == 0.0, f"padding got noise (max {padding_max:.3g})")
    r.expect(short < 0.8, "no row was much shorter than its batch: the per-example length is not exercised")
    r.expect(eval_events and all(k == "clean" for k, _ in eval_events),
             f"evaluation forwards were noised ({f['eval_forwards_clean']} clean)")


# ------------------------------------------------------------------------------------------------ 5. lean logits


def lean_logits(ctx: Context, r: Record) -> None:
    """The SFT loss with lean logits (``scoring.causal_lm_loss``) against the same loss computed from the model's
    whole logits, at vocabulary 152,064: loss and head gradient; peak memory of both and of TRL's SFTTrainer
    training step on the same batch (CUDA only)."""
    import importlib.util

    import torch
    import torch.nn.functional as F

    from tunesmith.scoring import causal_lm_loss

    s = ctx.sizes
    model = workspace.build_model(None, s.lean, ctx.dtype, ctx.device).train()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, s.lean.vocab, (1, s.lean_tokens), generator=g)
    labels = ids.clone()
    labels[:, : s.lean_tokens // 8] = -100  # a prompt
    batch = _to({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}, ctx.device)
    head = model.get_output_embeddings().weight

    with Peak(ctx.device) as lean_mem:
        loss_lean = causal_lm_loss(model, batch)
        loss_lean.backward()
    grad_lean = head.grad.detach().float().clone()
    model.zero_grad(set_to_none=True)
    with Peak(ctx.device) as full_mem:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        loss_full = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                    ignore_index=-100)
        loss_full.backward()
        del logits
    grad_full = head.grad.detach().float()
    model.zero_grad(set_to_none=True)
    f = r.figures
    f["vocab"], f["tokens"], f["dtype"] = s.lean.vocab, s.lean_tokens, ctx.dtype
    f["loss_lean"], f["loss_full"] = _round(loss_lean.item(), 7), _round(loss_full.item(), 7)
    rel = abs(loss_lean.item() - loss_full.item()) / abs(loss_full.item())
    grad_rel = ((grad_lean - grad_full).norm() / grad_full.norm()).item()
    f["loss_rel_diff"], f["head_grad_rel_diff"] = _round(rel, 3), _round(grad_rel, 3)
    tol = 1e-5 if ctx.dtype == "float32" else 1e-2
    r.expect(rel <= tol, f"lean loss {loss_lean.item():.6g} != full {loss_full.item():.6g} (rel {rel:.2g} > {tol})")
    r.expect(grad_rel <= 10 * tol, f"head gradients differ: rel {grad_rel:.2g} > {10 * tol}")
    del grad_lean, grad_full
    trl_bytes = None
    if importlib.util.find_spec("trl") is None:
        f["trl"] = "not installed"
    else:  # run on a CPU too: the wiring is checked, the memory is measured on CUDA only
        trl_bytes = _trl_step_memory(ctx, model, workspace.tokenizer(), batch)
    if not ctx.cuda:
        f["memory"] = "measured on CUDA only"
        return
    f["peak_gib_lean"], f["peak_gib_full"] = _gib(lean_mem.bytes), _gib(full_mem.bytes)
    f["lean_over_full"] = _round(lean_mem.bytes / full_mem.bytes, 3)
    r.expect(lean_mem.bytes < full_mem.bytes, "lean logits used no less memory than the full logits")
    if trl_bytes:
        f["peak_gib_trl"] = _gib(trl_bytes)
        f["lean_over_trl"] = _round(lean_mem.bytes / trl_bytes, 3)


def _trl_step_memory(ctx: Context, model, tok, batch: dict) -> int:
    """Peak memory of one TRL SFTTrainer training step (its compute_loss and backward) on ``batch``."""
    from datasets import Dataset
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer

    args = TRLConfig(output_dir=str(ctx.work / "trl-lean"), max_length=ctx.sizes.lean_tokens,
                     bf16=ctx.mixed_precision == "bf16", fp16=ctx.mixed_precision == "fp16", use_cpu=not ctx.cuda,
                     report_to="none", gradient_checkpointing=False, per_device_train_batch_size=1,
                     save_strategy="no", disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, processing_class=tok,
                         train_dataset=Dataset.from_list([{"prompt": "a", "completion": " b"}]))
    trainer.current_gradient_accumulation_steps = 1  # what train() sets before its first step
    n_items = (batch["labels"][:, 1:] != -100).sum()
    with Peak(ctx.device) as mem:
        trainer.training_step(trainer.model, dict(batch), num_items_in_batch=n_items)
    del trainer
    return mem.bytes


# ------------------------------------------------------------------------------------------------ 6. LoRA, QLoRA


def lora(ctx: Context, r: Record, quantized: bool = False) -> None:
    """A few LoRA (QLoRA: 4-bit NF4 base) steps through ``sft.train``: the held-out loss falls (evaluated before and
    after training), the adapter is saved, and reloaded from disk it gives the same loss."""
    from tunesmith.recipes.sft import train

    s = ctx.sizes
    out = ctx.work / ("qlora-out" if quantized else "lora-out")
    values = small_values(ctx, out, use_peft=True, load_in_4bit=quantized, lora_r=8, lora_alpha=16,
                          lora_dropout=0.0, max_steps=s.lora_steps, eval_dataset=small_data(ctx),
                          eval_strategy="steps", eval_steps=s.lora_steps, eval_on_start=True)
    train(values)
    losses = eval_losses(out)
    f = r.figures
    f["steps"] = s.lora_steps
    r.expect(len(losses) >= 2, f"expected an evaluation before and after training, got {len(losses)}")
    if len(losses) < 2:
        return
    before, after = losses[0], losses[-1]
    f["eval_loss"] = f"{before:.4f} -> {after:.4f}"
    r.expect(after < before, f"held-out loss did not fall ({f['eval_loss']})")
    saved = [p.name for p in out.iterdir()]
    r.expect("adapter_config.json" in saved and "adapter_model.safetensors" in saved,
             "no adapter_config.json / adapter_model.safetensors in the output")
    if (out / "adapter_model.safetensors").exists():
        f["adapter_mib"] = _round((out / "adapter_model.safetensors").stat().st_size / 2 ** 20, 3)
    reloaded, _ = reloaded_loss(ctx, out, values, quantized)
    f["reloaded_eval_loss"] = _round(reloaded, 6)
    tol = 1e-4 if ctx.dtype == "float32" else 1e-2
    r.expect(abs(reloaded - after) <= tol * abs(after),
             f"the reloaded adapter scores {reloaded:.6g}, the trained model {after:.6g}")
    shutil.rmtree(out, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ 7. plan


def plan_vs_measured(ctx: Context, r: Record) -> None:
    """``tunesmith plan`` for check 2's config (DDP on one GPU) against check 2's measured peak memory."""
    from tunesmith.plan import plan

    values, measured = ctx.shared.get("sft_values"), ctx.shared.get("sft_peak")
    if values is None or not measured:
        r.skip("check 2 (sft_vs_trl) measured no peak memory to compare with")
    result = plan(dict(values), num_gpus=1, source="selftest")
    ddp = result["strategies"]["ddp"]
    f = r.figures
    for key in ("weights", "gradients", "optimizer", "activations", "total"):
        f[f"plan_{key}_gib"] = _gib(ddp[key])
    f["measured_gib"] = _gib(measured)
    ratio = ddp["total"] / measured
    f["plan_over_measured"] = _round(ratio, 3)
    r.expect(abs(ratio - 1) <= 0.15, f"plan {ddp['total'] / GiB:.2f} GiB vs measured {measured / GiB:.2f} GiB: "
             f"off by {100 * (ratio - 1):+.0f}% (more than 15%)")


# ------------------------------------------------------------------------------------------------ 8. accelerate


def examples_dir() -> Path | None:
    """examples/accelerate of the checkout tunesmith runs from (or of the working directory)."""
    here = Path(__file__).resolve()
    for root in (here.parents[3], Path.cwd()):
        d = root / "examples" / "accelerate"
        if d.is_dir():
            return d
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error:" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


def accelerate_launch(ctx: Context, r: Record, config: str = "ddp") -> None:
    """``accelerate launch --config_file examples/accelerate/CONFIG.yaml -m tunesmith.cli sft``: a few steps, the
    collective save, and the saved model reloaded whole in this process with the run's own final eval loss."""
    import tunesmith

    d = examples_dir()
    if d is None or not (d / f"{config}.yaml").exists():
        r.skip(f"examples/accelerate/{config}.yaml not found (run from a tunesmith checkout)")
    import torch

    s = ctx.sizes
    processes = min(2, torch.cuda.device_count()) if ctx.cuda else 1
    out = ctx.work / f"accelerate-{config}"
    values = small_values(ctx, out, max_steps=s.accelerate_steps, eval_dataset=small_data(ctx))
    config_path = ctx.work / f"accelerate-{config}-sft.yaml"
    import yaml

    config_path.write_text(yaml.safe_dump(values), encoding="utf-8")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(d / f"{config}.yaml"),
           "--num_processes", str(processes)]
    cmd += ["--main_process_port", str(_free_port())] if ctx.cuda else ["--cpu", "--mixed_precision", "no"]
    cmd += ["-m", "tunesmith.cli", "sft", "--config", str(config_path)]
    src = str(Path(tunesmith.__file__).resolve().parents[1])  # the same tunesmith in the launched processes
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    f = r.figures
    f["processes"] = processes
    f["command"] = " ".join(["accelerate", "launch"] + cmd[3:]).replace(str(config_path), "SFT.yaml").replace(
        str(d.parent.parent) + os.sep, "")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300 if ctx.cuda else 180, check=False)
    with open(ctx.log_path, "a", encoding="utf-8") as log:
        log.write(f"--- {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}\n")
    if proc.returncode != 0:
        raise RuntimeError(f"accelerate launch exited with {proc.returncode}: {_error_line(proc.stderr)}")
    losses = eval_losses(out)
    r.expect(bool(losses), "the run logged no eval loss")
    train_losses = [row["loss"] for row in read_jsonl(out / "metrics.jsonl") if "loss" in row]
    f["train_loss"] = f"{train_losses[0]:.4f} -> {train_losses[-1]:.4f}" if train_losses else "none"
    if not losses:
        return
    reloaded, n = reloaded_loss(ctx, out, values)
    f["run_eval_loss"], f["reloaded_eval_loss"] = _round(losses[-1], 6), _round(reloaded, 6)
    f["reloaded_params"] = n
    r.expect(n == ctx.shared["small_params"],
             f"the saved model has {n} parameters, the model {ctx.shared['small_params']}")
    tol = 1e-4 if ctx.dtype == "float32" else 2e-2
    r.expect(abs(reloaded - losses[-1]) <= tol * abs(losses[-1]),
             f"reloaded model scores {reloaded:.6g}, the run's final evaluation {losses[-1]:.6g}")
    shutil.rmtree(out, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ 9. SPIN


def spin_iteration(ctx: Context, r: Record) -> None:
    """One SPIN iteration (generation, reference scoring, training, save) through ``spin.train``; its generation
    tokens/s against one raw ``model.generate`` call on the same prompt ids with the same sampling settings."""
    import time

    import torch

    from tunesmith.models import load_model_and_tokenizer
    from tunesmith.recipes import spin

    s = ctx.sizes
    data = workspace.write_jsonl(ctx.work / "spin.jsonl",
                                 workspace.records(s.spin_prompts, (4, 12), (4, 24), seed=4))
    out = ctx.work / "spin-out"
    values = small_values(ctx, out, dataset=data, num_iterations=1, beta=0.1, learning_rate=1e-4,
                          num_train_epochs=1, max_new_tokens=s.spin_new_tokens,
                          generation_batch_size=s.spin_prompts, shard_size=s.spin_prompts,
                          per_device_train_batch_size=2, do_sample=True)
    del values["train_loss_eval_samples"]  # an SFT key
    final = spin.train(values)
    done = json.loads((out / "tunesmith_run.json").read_text(encoding="utf-8"))["stages"]["finished"]
    gen, ref, tr = (done[f"iteration-0/{stage}"] for stage in ("generate", "reference", "train"))
    f = r.figures
    tokens = gen["prompts"] * gen["mean_generated_tokens"]
    spin_tps = tokens / gen["seconds"]
    f["prompts"], f["generated_tokens"] = gen["prompts"], round(tokens)
    f["spin_generate_tokens_per_s"] = _round(spin_tps)
    f["reference_s"], f["train_loss"] = _round(ref["seconds"], 3), tr.get("loss")
    f["reward_accuracy"] = tr.get("reward_accuracy")

    prompts = spin.SpinRun(spin.SPINConfig.from_dict(values)).prompts["prompt_ids"]  # the ids SPIN generated from
    model, tok = load_model_and_tokenizer(small_model(ctx), values["dtype"])
    model = model.to(ctx.device).eval()
    width = max(map(len, prompts))
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=ctx.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=ctx.device)
    options = dict(do_sample=True, temperature=0.8, top_p=0.95, pad_token_id=pad, eos_token_id=tok.eos_token_id)
    with torch.no_grad():
        model.generate(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=2, **options)  # warm-up
        if ctx.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        new = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=s.spin_new_tokens, **options)
        if ctx.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    new = new[:, width:].tolist()
    raw_tokens = sum(row.index(tok.eos_token_id) if tok.eos_token_id in row else len(row) for row in new)
    raw_tps = raw_tokens / seconds
    f["raw_generate_tokens_per_s"] = _round(raw_tps)
    f["spin_over_raw"] = _round(spin_tps / raw_tps, 3)
    del model
    reloaded, _ = load_model_and_tokenizer(final, values["dtype"])
    n = sum(p.numel() for p in reloaded.parameters())
    r.expect(n == ctx.shared["small_params"], f"the saved model has {n} parameters, the model "
             f"{ctx.shared['small_params']}")
    r.expect(tr.get("steps", 0) > 0, "SPIN trained no step")
    shutil.rmtree(out, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ the list

_FLEX_CPU = ("flex_attention on a CPU compiles its kernel for about a minute and has no backward there; checked on "
             "CUDA")

CHECKS = [
    Spec("1", "environment", environment),
    Spec("2", "sft_vs_trl", sft_vs_trl),
    Spec("3", "packed_sdpa", partial(packed_equals_unpacked, attn="sdpa")),
    Spec("3", "packed_flex_attention", partial(packed_equals_unpacked, attn="flex_attention"), cuda_only=True,
         cpu_reason=_FLEX_CPU),
    Spec("3", "packed_flash_attention_2", partial(packed_equals_unpacked, attn="flash_attention_2"),
         requires=("flash_attn",), cuda_only=True, cpu_reason="flash-attn runs on CUDA only"),
    Spec("3", "padding_free_sdpa", partial(packed_equals_unpacked, attn="sdpa", padding_free=True)),
    Spec("3", "padding_free_flash_attention_2",
         partial(packed_equals_unpacked, attn="flash_attention_2", padding_free=True), requires=("flash_attn",),
         cuda_only=True, cpu_reason="flash-attn runs on CUDA only"),
    Spec("4", "neftune_bf16", neftune_bf16),
    Spec("5", "lean_logits", lean_logits),
    Spec("6", "lora", lora),
    Spec("6", "qlora", partial(lora, quantized=True), requires=("bitsandbytes",)),
    Spec("7", "plan_vs_measured", plan_vs_measured, cuda_only=True,
         cpu_reason="compares with check 2's peak CUDA memory; there is none on a CPU"),
    Spec("8", "accelerate_fsdp2", partial(accelerate_launch, config="fsdp2"), cuda_only=True,
         cpu_reason="accelerate runs FSDP on GPUs only (it refuses FSDP on a CPU)"),
    Spec("8", "accelerate_ddp", partial(accelerate_launch, config="ddp")),
    Spec("8", "accelerate_zero3", partial(accelerate_launch, config="zero3"), requires=("deepspeed",),
         cuda_only=True, cpu_reason="DeepSpeed ZeRO-3 runs on GPUs only"),
    Spec("9", "spin_iteration", spin_iteration),
]
