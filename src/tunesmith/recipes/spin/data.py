"""SPIN's data on disk, in Arrow: the prompts with their real answers, the generated answers of every iteration, and
the training pairs assembled from both — memory-mapped tables, never lists of Python objects (the paper's 50k
prompts x 2 iterations x up to 2,048 tokens would be many GB per process).

* the prompt table (cached like SFT's tokenized data): ``loc``, ``prompt_ids`` (what the generator is
  given: the training rows' prefix), ``real_ids`` (the real answer's tokens as trained, with the template's
  end-of-answer tokens) and ``end_ids`` (those end tokens: every finished generated answer ends with them too);
* generation shards ``iteration-t/generations/shard-K.arrow`` (``index``: the prompt's row in the prompt table,
  ``ids``, ``text``, ``truncated``, ``seconds``), each written atomically;
* pairs: the prompt table's ``prompt_ids`` and ``real_ids`` (chosen) beside a generation table's ``ids``
  (rejected), concatenated column-wise without a copy.
"""
from __future__ import annotations

import time
from pathlib import Path

from tunesmith.errors import UserError
from tunesmith.preference.pairs import n_shards, read_shards, shard_path, write_shard

PROMPT_COLUMNS = ["loc", "prompt_ids", "real_ids", "end_ids"]


def answer_end_ids(tokenizer, template, example, real_ids: list[int], cache: dict | None = None) -> list[int]:
    """The tokens the template trains after the last answer's text: the EOS of plain templates, a chat template's
    end-of-turn text (Qwen's "<|im_end|>\\n"). A generated answer ends with exactly these, so real and generated rows
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
    cache = {} if cache is None else cache
    if tail not in cache:  # the same few tails for a whole data set: tokenized once each
        end = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
        if template.appends_eos and tokenizer.eos_token_id is not None:
            end = end + [tokenizer.eos_token_id]
        cache[tail] = end
    end = cache[tail]
    if end and real_ids[-len(end):] != end:
        raise UserError(f"{example.loc}: the answer's end-of-turn text {tail!r} tokenizes "
                        "differently next to the answer; it cannot be used for SPIN")
    return end


def prompt_rows(examples, tokenizer, template, max_length: int) -> dict:
    """Columns of the prompt table for a batch of examples (a prompt that leaves no room for an answer gets
    ``keep`` False)."""
    from tunesmith.data.tokenize import _tokens_batch

    batch = []
    for ex in examples:
        if ex.text is not None:
            raise UserError(f"{ex.loc}: a plain-text record has no prompt and real answer; SPIN needs both")
        answer = ex.turns[-1].response
        if answer is None or not answer.strip():
            raise UserError(f"{ex.loc}: the prompt has no real answer (SPIN trains real answers against generated "
                            "ones)")
        batch += [ex.for_generation(), ex]
    encoded = _tokens_batch(tokenizer, template, batch, train_on_prompt=False)
    out = {"loc": [], "prompt_ids": [], "real_ids": [], "end_ids": [], "keep": []}
    tails: dict = {}
    for i, ex in enumerate(examples):
        (prompt, _), (full, _) = encoded[2 * i], encoded[2 * i + 1]
        if full[:len(prompt)] != prompt:
            raise UserError(f"{ex.loc}: template {template.spec()!r} renders the generation prompt differently from "
                            "the training text; it cannot be used for SPIN")
        real = full[len(prompt):]
        out["loc"].append(ex.loc)
        out["prompt_ids"].append(prompt)
        out["real_ids"].append(real)
        out["end_ids"].append(answer_end_ids(tokenizer, template, ex, real, tails))
        out["keep"].append(len(prompt) < max_length)
    return out


def _prompt_map(batch: dict, tokenizer, template, max_length: int) -> dict:
    from tunesmith.data.prepare import row_examples

    return prompt_rows(row_examples(batch), tokenizer, template, max_length)


def _prompt_features():
    from datasets import Features, List, Value

    ids = List(Value("int32"))
    return Features({"loc": Value("string"), "prompt_ids": ids, "real_ids": ids, "end_ids": ids,
                     "keep": Value("bool")})


def prepare_prompts(sources: list, tokenizer, template, max_length: int, *, mixture: str = "concat", seed: int = 0,
                    num_proc: int | None = None, cache_dir=None):
    """The prompt table of the SFT data (``sources`` opened by :func:`tunesmith.data.source.open_sources`; each
    source tokenized once through the data entry and cached, several mixed as the entry mixes token rows), the
    prompts dropped for leaving no room for an answer (count, first locations), and the cache keys of the sources'
    tables (they identify the tokenized prompts in the run's fingerprint)."""
    from tunesmith.data.preference import keep_rows, kept_table, mix_tables

    tables, dropped, first, keys = [], 0, [], []
    for source in sources:
        def describe(table, kept, drop, source=source):
            if not len(kept):
                raise UserError(f"{source.display}: no prompt fits in max_length={max_length} with room for an "
                                "answer")
            return {"dropped": len(drop), "first_dropped": [table[int(i)]["loc"] for i in drop[:3]]}

        tmpl = source.template(template, tokenizer)
        table, manifest = source.mapped(
            _prompt_map, key={"stage": "spin prompts", "template": tmpl.spec(), "max_length": max_length},
            features=_prompt_features(), tokenizer=tokenizer,
            fn_kwargs={"tokenizer": tokenizer, "template": tmpl, "max_length": max_length}, num_proc=num_proc,
            cache_dir=cache_dir, desc=f"SPIN prompts of {source.display}", finish=keep_rows("keep", True, describe))
        tables.append(kept_table(table, manifest))
        dropped += manifest["summary"]["dropped"]
        first += manifest["summary"]["first_dropped"]
        keys.append(manifest["entry"].rsplit("/", 1)[-1])
    return mix_tables(tables, sources, mixture, seed, PROMPT_COLUMNS, cache_dir), dropped, first[:3], keys


# ------------------------------------------------------------------------------------------------ generation


def shard_seed(seed: int, t: int, k: int) -> int:
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


def generate_shards(cfg, model, tokenizer, prompts, t: int, directory: Path, on_event=None,
                    model_path: str | None = None) -> None:
    """Answer every prompt of the prompt table with theta_t; each missing shard of this rank is generated and written
    atomically (under torchrun rank r takes shards r, r + world, ...).

    ``generation_backend: hf`` runs ``model`` with batched HF generation, seeded per shard. ``vllm`` runs the model
    saved at ``model_path`` in one vLLM engine for all of this rank's missing shards, with the same prompt ids and one
    seed per prompt derived from its shard's seed (so a shard's answers do not depend on what else is generated)."""
    from tunesmith.generate import generate, generate_vllm, request_seed

    spin, args = cfg.spin, cfg.training
    size = spin.shard_size
    todo = [k for k in range(args.process_index, n_shards(len(prompts), size), args.world_size)
            if not shard_path(directory, k).exists()]
    settings = {"max_new_tokens": spin.max_new_tokens, **generation_settings(cfg, model, model_path)}

    def chunk(k: int) -> dict:
        return prompts[k * size:(k + 1) * size]  # columns of the shard's prompts, read from the memory map

    vllm_outs, vllm_seconds = {}, 0.0
    if todo and spin.generation_backend == "vllm":
        start = time.perf_counter()
        chunks = {k: chunk(k) for k in todo}
        ids = [p for k in todo for p in chunks[k]["prompt_ids"]]
        seeds = [request_seed(shard_seed(args.seed, t, k), j) for k in todo
                 for j in range(len(chunks[k]["prompt_ids"]))]
        outs = iter(generate_vllm(model_path, ids, tokenizer=tokenizer, request_seeds=seeds, dtype=cfg.model.dtype,
                                  **settings))
        vllm_outs = {k: [next(outs) for _ in chunks[k]["prompt_ids"]] for k in todo}
        vllm_seconds = (time.perf_counter() - start) / len(todo)
    for k in todo:
        start = time.perf_counter()
        rows = chunk(k)
        if spin.generation_backend == "vllm":
            outs = vllm_outs.pop(k)
        else:
            outs = generate(model, tokenizer, rows["prompt_ids"], batch_size=spin.generation_batch_size,
                            seed=shard_seed(args.seed, t, k), **settings)
        # the answer as generated, ended as the template ends real answers (a cut answer has no end)
        ids = [o["output_ids"] + ([] if o["truncated"] else end) for o, end in zip(outs, rows["end_ids"])]
        seconds = time.perf_counter() - start + vllm_seconds
        write_shard(shard_path(directory, k), {"index": list(range(k * size, k * size + len(ids))), "ids": ids,
                                               "text": [o["output"] for o in outs],
                                               "truncated": [bool(o["truncated"]) for o in outs],
                                               "seconds": [seconds] * len(ids)})
        if on_event:
            on_event("generate", t, k)


def read_generations(directory: Path, n_prompts: int, shard_size: int):
    """The generation shards of one iteration as one memory-mapped table, checked to hold each prompt once."""
    import numpy as np

    gens = read_shards(directory, n_shards(n_prompts, shard_size))
    index = gens.data.column("index").to_numpy()
    if len(index) != n_prompts or not np.array_equal(index, np.arange(n_prompts)):
        raise UserError(f"{directory}: shards do not hold each prompt exactly once (the run directory was modified)")
    return gens


def generation_metrics(prompts, gens) -> dict:
    """Counts over one iteration's generations, read batch by batch (never a column of a 200k-row table as Python
    lists): answers cut at max_new_tokens, answers token for token the real one, mean answer length."""
    import pyarrow.compute as pc

    table = gens.data
    lengths = pc.list_value_length(table.column("ids"))
    same, batch = 0, 1000
    for start in range(0, len(gens), batch):
        real = prompts[start:start + batch]["real_ids"]
        same += sum(a == b for a, b in zip(gens[start:start + batch]["ids"], real))
    return {"prompts": len(gens), "truncated": int(pc.sum(table.column("truncated")).as_py() or 0),
            "identical": same / len(gens), "mean_generated_tokens": float(pc.mean(lengths).as_py())}


def assemble_pairs(prompts, generations: list):
    """The training pairs of the given generation tables, in order (table, prompt index): the prompt and real answer
    (chosen) beside the generated answer (rejected), concatenated without a copy."""
    from datasets import concatenate_datasets

    base = prompts.select_columns(["prompt_ids", "real_ids"]).rename_column("real_ids", "chosen_ids")
    parts = [concatenate_datasets([base, g.select_columns(["ids"]).rename_column("ids", "rejected_ids")], axis=1)
             for g in generations]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)
