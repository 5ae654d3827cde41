"""SPIN's data on disk, in Arrow: the prompts with their real answers, the generated answers of every iteration, and
the training pairs assembled from both — memory-mapped tables, never lists of Python objects (the paper's 50k
prompts x 2 iterations x up to 2,048 tokens would be many GB per process).

* the prompt table (cached like SFT's tokenized data): ``index``, ``loc``, ``prompt_ids`` (what the generator is
  given: the training rows' prefix), ``real_ids`` (the real answer's tokens as trained, with the template's
  end-of-answer tokens) and ``end_ids`` (those end tokens: every finished generated answer ends with them too);
* generation shards ``iteration-t/generations/shard-K.arrow`` (``index``, ``ids``, ``text``, ``truncated``,
  ``seconds``), each written atomically;
* pairs: the prompt table's ``prompt_ids`` and ``real_ids`` (chosen) beside a generation table's ``ids``
  (rejected), concatenated column-wise without a copy.
"""
from __future__ import annotations

import time
from pathlib import Path

from tunesmith.errors import UserError
from tunesmith.preference.pairs import n_shards, read_shards, shard_path, write_shard

PROMPT_COLUMNS = ["index", "loc", "prompt_ids", "real_ids", "end_ids"]


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
    from tunesmith.data.prepare import _row_examples

    return prompt_rows(_row_examples(batch), tokenizer, template, max_length)


def _prompt_features():
    from datasets import Features, List, Value

    ids = List(Value("int32"))
    return Features({"loc": Value("string"), "prompt_ids": ids, "real_ids": ids, "end_ids": ids,
                     "keep": Value("bool")})


def prepare_prompts(data, tokenizer, template, *, cache_dir=None):
    """The prompt table of the SFT set (memory-mapped, cached by the data's bytes, tokenizer, template and
    ``max_length``), the locations of the prompts dropped for leaving no room for an answer (the first few) and
    their count, and the cache key (it identifies the tokenized prompts in the run's fingerprint)."""
    import json
    import os
    import shutil
    import tempfile

    import datasets
    import numpy as np
    from datasets import Dataset

    from tunesmith.data.prepare import _fingerprint, _node_main_process_first, _write_examples

    root = Path(cache_dir) if cache_dir else Path(datasets.config.HF_DATASETS_CACHE) / "tunesmith"
    with _node_main_process_first():
        key = _fingerprint(data.dataset, data.dataset_split, f"spin-prompts:{data.dataset_format}", tokenizer,
                           template, data.max_length, False)
        entry = root / key
        if not (entry / "manifest.json").exists():
            root.mkdir(parents=True, exist_ok=True)
            build = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}.building-"))
            try:
                _write_examples(data.dataset, data.dataset_split, data.dataset_format, build / "examples.arrow")
                rows = Dataset.from_file(str(build / "examples.arrow")).map(
                    _prompt_map, batched=True, batch_size=1000, features=_prompt_features(),
                    fn_kwargs={"tokenizer": tokenizer, "template": template, "max_length": data.max_length},
                    remove_columns=["turns", "system", "input", "text"], cache_file_name=str(build / "rows.arrow"),
                    load_from_cache_file=False, new_fingerprint=key, desc=f"SPIN prompts of {data.dataset}")
                keep = rows.data.column("keep").to_numpy(zero_copy_only=False)
                dropped = np.flatnonzero(~keep)
                kept = rows.select(np.flatnonzero(keep)).remove_columns("keep")
                if not len(kept):
                    raise UserError(f"{data.dataset}: no prompt fits in max_length={data.max_length} with room for "
                                    "an answer")
                kept = kept.add_column("index", np.arange(len(kept), dtype=np.int64))
                kept.flatten_indices(cache_file_name=str(build / "prompts.arrow"))
                manifest = {"dropped": len(dropped), "first_dropped": [rows[i]["loc"] for i in dropped[:3].tolist()]}
                del rows, kept
                for name in ("examples.arrow", "rows.arrow"):
                    (build / name).unlink()
                (build / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
                try:
                    os.rename(build, entry)
                except OSError:
                    if not (entry / "manifest.json").exists():
                        raise
            finally:
                shutil.rmtree(build, ignore_errors=True)
        manifest = json.loads((entry / "manifest.json").read_text(encoding="utf-8"))
        prompts = Dataset.from_file(str(entry / "prompts.arrow")).select_columns(PROMPT_COLUMNS)
    return prompts, manifest["dropped"], manifest["first_dropped"], key


# ------------------------------------------------------------------------------------------------ generation


def shard_seed(seed: int, t: int, k: int) -> int:
    return (seed * 1_000_003 + t * 10_007 + k) % (2**31 - 1)


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
    settings = dict(max_new_tokens=spin.max_new_tokens, do_sample=spin.do_sample, temperature=spin.temperature,
                    top_p=spin.top_p, repetition_penalty=spin.repetition_penalty)

    def chunk(k: int) -> dict:
        return prompts[k * size:(k + 1) * size]  # columns of the shard's prompts, read from the memory map

    vllm_outs, vllm_seconds = {}, 0.0
    if todo and spin.generation_backend == "vllm":
        start = time.perf_counter()
        chunks = {k: chunk(k) for k in todo}
        ids = [p for k in todo for p in chunks[k]["prompt_ids"]]
        seeds = [request_seed(shard_seed(args.seed, t, k), j) for k in todo for j in range(len(chunks[k]["index"]))]
        outs = iter(generate_vllm(model_path, ids, tokenizer=tokenizer, request_seeds=seeds, dtype=cfg.model.dtype,
                                  **settings))
        vllm_outs = {k: [next(outs) for _ in chunks[k]["index"]] for k in todo}
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
        write_shard(shard_path(directory, k), {"index": rows["index"], "ids": ids,
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
