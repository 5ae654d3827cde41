"""Batched generation (`tunesmith generate`) with the prompt template a model was trained with.

Prompts are sorted by length (longest first) and cut into batches, each left-padded to its own longest prompt, and
generated with the KV cache; outputs come back in input order. Greedy decoding gives the same outputs whatever the
batch size or order (up to float rounding: padding is masked and position ids follow the attention mask). Sampling
with a seed is reproducible for the same prompts and batch size (the random stream depends on the batch layout).

Output JSONL, one row per prompt, readable by alpaca_eval (``instruction``, ``output``, ``generator``) plus:
``input`` (alpaca input, if any), ``reference`` (the record's own answer, if it had one — what ``tunesmith eval``
compares against), ``truncated`` (the output hit ``max_new_tokens`` without an end-of-sequence token),
``new_tokens`` and ``decoding`` (the settings used).

The NEFTune paper evaluates with greedy decoding and ``repetition_penalty`` 1.2; its Table 5 controls are
``min_new_tokens`` (EOS blocked until a minimum length) and ``prompt_suffix`` (asking for a longer answer).
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from tunesmith.errors import UserError

DECODING_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty",
                 "min_new_tokens", "seed")


def _eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in (gen_eos, tokenizer.eos_token_id):
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    return sorted(ids)


def generate(model, tokenizer, prompt_ids: list[list[int]], *, batch_size: int = 32, max_new_tokens: int = 256,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             repetition_penalty: float = 1.0, min_new_tokens: int = 0, seed: int | None = 0,
             progress: bool = False) -> list[dict]:
    """Generate a continuation for every prompt (token-id lists). Returns, in input order, dicts with ``output``
    (decoded text without special tokens), ``output_ids`` (up to, not including, the EOS), ``new_tokens`` and
    ``truncated`` (no EOS within ``max_new_tokens``)."""
    import torch

    from tunesmith.models import eval_mode

    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    for i, p in enumerate(prompt_ids):
        if not p:
            raise UserError(f"prompt {i} is empty (no tokens)")
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    device = next(model.parameters()).device
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, repetition_penalty=repetition_penalty,
                  pad_token_id=pad, eos_token_id=eos or None, use_cache=True)
    if min_new_tokens:
        kwargs["min_new_tokens"] = min_new_tokens
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
    else:  # neutralise sampling knobs a checkpoint's generation_config may carry
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if seed is not None:
        torch.manual_seed(seed)

    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    results: list[dict | None] = [None] * len(prompt_ids)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompt_ids), desc="generate", unit="prompt", file=sys.stderr)
    try:
        with eval_mode(model):
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                width = max(len(prompt_ids[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    p = prompt_ids[i]
                    ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
                    mask[row, width - len(p):] = 1
                with torch.no_grad():
                    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
                new = out[:, width:].tolist()
                for row, i in enumerate(idx):
                    toks = new[row]
                    cut = next((k for k, t in enumerate(toks) if t in eos), None)
                    kept = toks if cut is None else toks[:cut]
                    results[i] = {"output": tokenizer.decode(kept, skip_special_tokens=True), "output_ids": kept,
                                  "new_tokens": len(kept) + (cut is not None), "truncated": cut is None}
                if bar:
                    bar.update(len(idx))
    finally:
        if bar:
            bar.close()
    return results  # type: ignore[return-value]


def generate_vllm(model_path: str, prompt_ids: list[list[int]], *, max_new_tokens: int = 256,
                  do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                  repetition_penalty: float = 1.0, min_new_tokens: int = 0, seed: int | None = 0,
                  tokenizer=None, **_) -> list[dict]:
    """The same contract as :func:`generate`, run by vLLM (GPU). Greedy = temperature 0."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise UserError("backend 'vllm': the vllm package is not installed (pip install 'tunesmith[vllm]'; it needs "
                        "a GPU); use backend 'hf'") from None
    llm = LLM(model=model_path, tokenizer=model_path, seed=seed or 0)
    params = SamplingParams(max_tokens=max_new_tokens, min_tokens=min_new_tokens,
                            temperature=temperature if do_sample else 0.0, top_p=top_p if do_sample else 1.0,
                            top_k=(top_k or -1) if do_sample else -1, repetition_penalty=repetition_penalty,
                            seed=seed)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params)
    return [{"output": o.outputs[0].text, "output_ids": list(o.outputs[0].token_ids),
             "new_tokens": len(o.outputs[0].token_ids), "truncated": o.outputs[0].finish_reason == "length"}
            for o in outs]


# ---------------------------------------------------------------- CLI

@dataclass
class GenerateConfig:
    model_name_or_path: str = field(default="", metadata={"help": "model directory (trained by tunesmith, or any "
                                                                   "causal LM)"})
    prompts: str = field(default="", metadata={"help": "prompts file in any SFT format (json/jsonl/csv/parquet) "
                                                       "or a dataset name; answers, if present, become 'reference'"})
    output: str = field(default="", metadata={"help": "output JSONL (alpaca_eval compatible)"})
    dataset_split: str = field(default="train", metadata={"help": "split, for a hub dataset"})
    dataset_format: str = field(default="auto", metadata={"help": "auto, alpaca, prompt_completion, messages, "
                                                                  "sharegpt"})
    template: str = field(default="", metadata={"help": "prompt template (default: the one the model was saved "
                                                        "with)"})
    generator: str = field(default="", metadata={"help": "name written in the 'generator' field (default: the "
                                                         "model directory's name)"})
    backend: Literal["hf", "vllm"] = field(default="hf", metadata={"help": "hf (transformers) or vllm (GPU)"})
    batch_size: int = field(default=32, metadata={"help": "prompts per batch (length-sorted, so padding stays small)"})
    max_new_tokens: int = field(default=256, metadata={"help": "generation budget per prompt"})
    do_sample: bool = field(default=False, metadata={"help": "sample instead of greedy decoding"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    top_k: int = field(default=0, metadata={"help": "top-k sampling (0: off)"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "the NEFTune paper uses 1.2 with greedy"})
    min_new_tokens: int = field(default=0, metadata={"help": "block EOS until this many new tokens (Table 5)"})
    prompt_suffix: str = field(default="", metadata={"help": "text appended to every prompt, after a space "
                                                             "unless it starts with whitespace (Table 5: ask for "
                                                             "longer answers)"})
    seed: int = field(default=0, metadata={"help": "random seed (sampling)"})
    limit: int = field(default=0, metadata={"help": "only the first N prompts (0: all)"})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16, float16"})

    def __post_init__(self):
        for key in ("model_name_or_path", "prompts", "output"):
            if not getattr(self, key):
                raise UserError(f"'{key}' is required")

    def decoding(self) -> dict:
        d = asdict(self)
        return {k: d[k] for k in DECODING_KEYS} | {"prompt_suffix": self.prompt_suffix, "backend": self.backend}


def prompt_rows(cfg: GenerateConfig, tokenizer, template) -> tuple[list[list[int]], list[dict]]:
    """Encode every prompt of ``cfg.prompts`` with ``template``; returns (token ids, row metadata)."""
    from tunesmith.data.formats import to_examples
    from tunesmith.data.load import load_records
    from tunesmith.data.tokenize import encode_prompt

    records = load_records(cfg.prompts, cfg.dataset_split)
    if not records:
        raise UserError(f"{cfg.prompts}: no prompts")
    if cfg.limit:
        records = records[:cfg.limit]
    examples = to_examples(records, cfg.dataset_format, require_response=False)
    ids, meta = [], []
    for ex in examples:
        if ex.text is not None:
            raise UserError(f"{ex.loc}: a plain-text record has no prompt to answer (use a prompt/response format)")
        reference = ex.turns[-1].response
        ex = ex.for_generation()
        instruction = ex.turns[-1].prompt
        if cfg.prompt_suffix:
            sep = "" if cfg.prompt_suffix[:1].isspace() else " "
            ex.turns[-1].prompt = instruction + sep + cfg.prompt_suffix
        ids.append(encode_prompt(tokenizer, template, ex))
        row = {"instruction": instruction}
        if ex.input:
            row["input"] = ex.input
        if reference is not None:
            row["reference"] = reference
        row["loc"] = ex.loc
        meta.append(row)
    return ids, meta


def run(cfg: GenerateConfig) -> str:
    from tunesmith.data.templates import get_template, load_saved_template
    from tunesmith.io import atomic_write_jsonl
    from tunesmith.models import load_model_and_tokenizer, load_tokenizer

    settings = {k: getattr(cfg, k) for k in DECODING_KEYS}
    if cfg.backend == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise UserError("backend 'vllm': the vllm package is not installed (pip install 'tunesmith[vllm]'; it "
                            "needs a GPU); use backend 'hf'") from None
        model, tokenizer = None, load_tokenizer(cfg.model_name_or_path)
    else:
        model, tokenizer = load_model_and_tokenizer(cfg.model_name_or_path, dtype=cfg.dtype)
    template = get_template(cfg.template, tokenizer) if cfg.template else load_saved_template(cfg.model_name_or_path, tokenizer)
    ids, meta = prompt_rows(cfg, tokenizer, template)
    if cfg.backend == "vllm":
        outs = generate_vllm(cfg.model_name_or_path, ids, **settings)
    else:
        outs = generate(model, tokenizer, ids, batch_size=cfg.batch_size, progress=True, **settings)
    generator = cfg.generator or Path(cfg.model_name_or_path.rstrip("/")).name
    decoding = cfg.decoding() | {"template": template.spec()}
    rows = [m | {"output": o["output"], "generator": generator, "truncated": o["truncated"],
                 "new_tokens": o["new_tokens"], "decoding": decoding} for m, o in zip(meta, outs)]
    atomic_write_jsonl(cfg.output, rows)
    n_trunc = sum(r["truncated"] for r in rows)
    print(f"wrote {len(rows)} generations to {cfg.output} ({n_trunc} cut at max_new_tokens={cfg.max_new_tokens})")
    return cfg.output


def cli(argv: list[str]) -> int:
    from tunesmith.config import parse_cli

    cfg = parse_cli(GenerateConfig, argv, "generate",
                    "Generate an answer for every prompt of a file with a model's saved prompt template; writes "
                    "alpaca_eval-compatible JSONL.")
    if cfg is None:
        return 0
    run(cfg)
    return 0
