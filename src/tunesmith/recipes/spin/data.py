"""SPIN's data: prompts and real answers, training pairs, and generation shards on disk."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.data.collate import Collator
from tunesmith.data.tokenize import IGNORE, encode, encode_prompt
from tunesmith.errors import UserError
from tunesmith.io import atomic_write_json


class PairCollator:
    """B pairs -> one right-padded batch of 2B rows (the B real answers, then the B generated) + reference log-probs."""

    def __init__(self, pad_token_id: int):
        self.rows = Collator(pad_token_id)

    def __call__(self, features: list[dict]) -> dict:
        batch = self.rows([f["real"] for f in features] + [f["generated"] for f in features])
        if "ref_real" in features[0]:
            batch["ref_real"] = torch.tensor([f["ref_real"] for f in features], dtype=torch.float32)
            batch["ref_generated"] = torch.tensor([f["ref_generated"] for f in features], dtype=torch.float32)
        return batch


@dataclass
class Prompt:
    index: int
    loc: str
    prompt_ids: list[int]  # what the generator is given: the training rows' prefix
    real_ids: list[int]  # the real answer's tokens as trained (with the template's end-of-answer tokens)
    end_ids: list[int]  # the template's end-of-answer tokens: every finished generated answer ends with them too


def answer_end_ids(tokenizer, template, example, real_ids: list[int]) -> list[int]:
    """The tokens the template trains after the last answer's text: the EOS of plain templates, a chat template's
    end-of-turn text (Qwen's "<|im_end|>\n"). A generated answer ends with exactly these, so real and generated rows
    differ only in the answer itself (a tail trained on real rows only would be a free margin for the loss)."""
    text, trained = template.segments(example)[-1]
    answer = example.turns[-1].response
    if text.rfind(answer) < 0:  # a chat template may trim the answer
        answer = answer.strip()
    at = text.rfind(answer)
    if not trained or at < 0:
        raise UserError(f"{example.loc}: template {template.spec()!r} does not render the answer text verbatim; it "
                        "cannot be used for SPIN")
    tail = text[at + len(answer):]
    end = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    if template.appends_eos and tokenizer.eos_token_id is not None:
        end = end + [tokenizer.eos_token_id]
    if end and real_ids[-len(end):] != end:
        raise UserError(f"{example.loc}: the answer's end-of-turn text {tail!r} tokenizes "
                        "differently next to the answer; it cannot be used for SPIN")
    return end


def build_prompts(examples, tokenizer, template, max_length: int, source: str) -> tuple[list[Prompt], list[str]]:
    """Prompts and real answers of an SFT set; prompts that leave no room for an answer are dropped (listed)."""
    prompts, dropped = [], []
    for ex in examples:
        if ex.text is not None:
            raise UserError(f"{ex.loc}: a plain-text record has no prompt and real answer; SPIN needs both")
        answer = ex.turns[-1].response
        if answer is None or not answer.strip():
            raise UserError(f"{ex.loc}: the prompt has no real answer (SPIN trains real answers against generated "
                            "ones)")
        prompt = encode_prompt(tokenizer, template, ex)
        full = encode(tokenizer, template, ex, max_length=10**9)
        if full is None or full["input_ids"][: len(prompt)] != prompt:
            raise UserError(f"{ex.loc}: template {template.spec()!r} renders the generation prompt differently from "
                            "the training text; it cannot be used for SPIN")
        if len(prompt) >= max_length:
            dropped.append(ex.loc)
            continue
        real = full["input_ids"][len(prompt):]
        prompts.append(Prompt(len(prompts), ex.loc, prompt, real, answer_end_ids(tokenizer, template, ex, real)))
    if not prompts:
        raise UserError(f"{source}: no prompt fits in max_length={max_length} with room for an answer")
    return prompts, dropped


def pair_row(prompt_ids: list[int], answer_ids: list[int], max_length: int) -> dict:
    ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + answer_ids)[:max_length]
    return {"input_ids": ids, "labels": labels}


# ------------------------------------------------------------------------------------------------ shards on disk


def shard_path(directory: Path, k: int) -> Path:
    return directory / f"shard-{k:05d}.json"


def read_shards(directory: Path, n_shards: int) -> list[dict]:
    shards = []
    for k in range(n_shards):
        path = shard_path(directory, k)
        try:
            shards.append(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise UserError(f"{path}: missing shard (the run directory was modified)") from None
    return shards


def _shard_seed(seed: int, t: int, k: int) -> int:
    return (seed * 1_000_003 + t * 10_007 + k) % (2**31 - 1)


def generation_settings(cfg, model=None, model_path: str | None = None) -> dict:
    """The decoding settings theta_t generates with (:meth:`SPINArgs.sampling`), read from ``model``'s
    generation_config, or from the one saved at ``model_path`` (the vLLM backend)."""
    gc = getattr(model, "generation_config", None)
    if gc is None and model_path is not None:
        from transformers import GenerationConfig

        try:
            gc = GenerationConfig.from_pretrained(model_path)
        except (OSError, ValueError):
            gc = None
    return cfg.spin.sampling(gc)


def generate_shards(cfg, model, tokenizer, prompts: list[Prompt], t: int, directory: Path,
                    on_event=None, model_path: str | None = None) -> None:
    """Answer every prompt with theta_t; each missing shard of this rank is generated and written atomically.

    ``generation_backend: hf`` runs ``model`` with batched HF generation, seeded per shard. ``vllm`` runs the model
    saved at ``model_path`` in one vLLM engine for all of this rank's missing shards, with the same prompt ids and one
    seed per prompt derived from its shard's seed (so a shard's answers do not depend on what else is generated)."""
    from tunesmith.generate import generate, generate_vllm, request_seed

    spin, args = cfg.spin, cfg.training
    n_shards = -(-len(prompts) // spin.shard_size)
    todo = [k for k in range(args.process_index, n_shards, args.world_size) if not shard_path(directory, k).exists()]
    settings = {"max_new_tokens": spin.max_new_tokens, **generation_settings(cfg, model, model_path)}
    chunks = {k: prompts[k * spin.shard_size:(k + 1) * spin.shard_size] for k in todo}
    vllm_outs, vllm_seconds = {}, 0.0
    if todo and spin.generation_backend == "vllm":
        start = time.perf_counter()
        ids = [p.prompt_ids for k in todo for p in chunks[k]]
        seeds = [request_seed(_shard_seed(args.seed, t, k), j) for k in todo for j in range(len(chunks[k]))]
        outs = iter(generate_vllm(model_path, ids, tokenizer=tokenizer, request_seeds=seeds, dtype=cfg.model.dtype,
                                  **settings))
        vllm_outs = {k: [next(outs) for _ in chunks[k]] for k in todo}
        vllm_seconds = (time.perf_counter() - start) / len(todo)
    for k in todo:
        start = time.perf_counter()
        chunk = chunks[k]
        if spin.generation_backend == "vllm":
            outs = vllm_outs[k]
        else:
            outs = generate(model, tokenizer, [p.prompt_ids for p in chunk], batch_size=spin.generation_batch_size,
                            seed=_shard_seed(args.seed, t, k), **settings)
        rows = []
        for p, o in zip(chunk, outs):
            # the answer as generated, ended as the template ends real answers (a cut answer has no end)
            ids = o["output_ids"] + ([] if o["truncated"] else p.end_ids)
            rows.append({"index": p.index, "prompt_ids": p.prompt_ids, "ids": ids, "text": o["output"],
                         "truncated": o["truncated"]})
        seconds = time.perf_counter() - start + vllm_seconds
        atomic_write_json(shard_path(directory, k), {"shard": k, "seconds": seconds, "rows": rows})
        if on_event:
            on_event("generate", t, k)


