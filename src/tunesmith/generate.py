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

Sampling with ``temperature`` 0 is greedy decoding (the limit of sampling as the temperature goes to 0, and what
vLLM and the OpenAI API do; transformers alone would refuse it): the CLI says so and records ``do_sample: false``.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from tunesmith.config import field
from tunesmith.errors import UserError

log = logging.getLogger("tunesmith")

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


class _TokenHook:
    """A stopping criterion that hands every new token of a live row to ``on_token(prompt_index, token_id)`` as it is
    generated (EOS included); a true return stops that row after the token (its later positions are padding)."""

    def __init__(self, idx: list[int], eos: list[int], on_token):
        self.idx, self.eos, self.on_token = idx, set(eos), on_token
        self.live = [True] * len(idx)
        self.kept: list[int | None] = [None] * len(idx)  # tokens kept when the caller stopped the row
        self.steps = 0

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.steps += 1
        last = input_ids[:, -1].tolist()
        for row, i in enumerate(self.idx):
            if not self.live[row]:
                continue
            token = last[row]
            stop = self.on_token(i, token)
            if token in self.eos:
                self.live[row] = False
            elif stop:
                self.live[row], self.kept[row] = False, self.steps
        return torch.tensor([not live for live in self.live], dtype=torch.bool, device=input_ids.device)


def generate(model, tokenizer, prompt_ids: list[list[int]], *, batch_size: int = 32, max_new_tokens: int = 256,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             repetition_penalty: float = 1.0, min_new_tokens: int = 0, seed: int | None = 0,
             progress: bool = False, on_token=None) -> list[dict]:
    """Generate a continuation for every prompt (token-id lists). Returns, in input order, dicts with ``output``
    (decoded text without special tokens), ``output_ids`` (up to, not including, the EOS), ``new_tokens`` and
    ``truncated`` (no EOS within ``max_new_tokens``).

    ``on_token(prompt_index, token_id) -> bool``: called with every new token of a prompt as soon as it is generated
    (streaming; ``tunesmith chat`` and ``tunesmith serve``); returning True stops that prompt after the token (its
    output then ends there, ``truncated`` false) while the others of its batch go on."""
    import torch
    from transformers import StoppingCriteriaList

    from tunesmith.models import eval_mode

    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    check_decoding(temperature, top_p, top_k, repetition_penalty, min_new_tokens)
    if do_sample and temperature == 0:
        do_sample = False  # temperature 0 is greedy decoding (see the module docstring)
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
                hook = _TokenHook(idx, eos, on_token) if on_token is not None else None
                with torch.no_grad():
                    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs,
                                         **({"stopping_criteria": StoppingCriteriaList([hook])} if hook else {}))
                new = out[:, width:].tolist()
                for row, i in enumerate(idx):
                    toks = new[row]
                    if hook is not None and hook.kept[row] is not None:  # stopped by the caller
                        toks = toks[:hook.kept[row]]
                    cut = next((k for k, t in enumerate(toks) if t in eos), None)
                    kept = toks if cut is None else toks[:cut]
                    stopped = hook is not None and hook.kept[row] is not None
                    results[i] = {"output": tokenizer.decode(kept, skip_special_tokens=True), "output_ids": kept,
                                  "new_tokens": len(kept) + (cut is not None),
                                  "truncated": cut is None and not stopped}
                if bar:
                    bar.update(len(idx))
    finally:
        if bar:
            bar.close()
    return results  # type: ignore[return-value]


def check_decoding(temperature: float, top_p: float, top_k: int, repetition_penalty: float,
                   min_new_tokens: int) -> None:
    """One-line errors for decoding settings no backend can use."""
    from tunesmith import checks

    checks.non_negative("temperature", temperature, why="0 = greedy")
    checks.number("top_p", top_p, low=0, high=1, low_open=True)
    checks.non_negative("top_k", top_k, why="0 = off")
    checks.positive("repetition_penalty", repetition_penalty, why="1 = off")
    checks.non_negative("min_new_tokens", min_new_tokens)


def request_seed(seed: int, index: int) -> int:
    """The sampling seed of request ``index`` in a run seeded with ``seed`` (vLLM backend): one stream per prompt,
    so a prompt's sample does not depend on which other prompts share its batch."""
    return (seed * 1_000_003 + index) % (2**31 - 1)


def generate_vllm(model_path: str, prompt_ids: list[list[int]], *, max_new_tokens: int = 256,
                  do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                  repetition_penalty: float = 1.0, min_new_tokens: int = 0, seed: int | None = 0,
                  tokenizer=None, request_seeds: list[int] | None = None, dtype: str = "auto",
                  **_) -> list[dict]:
    """The same contract as :func:`generate`, run by vLLM (GPU). Greedy = temperature 0.

    * vLLM is given the prompts as token ids (``prompt_token_ids``), exactly the ids the HF path feeds
      ``model.generate``: no text round-trip, no second tokenization, no template applied by vLLM.
    * Each request has its own ``SamplingParams`` with its own seed: ``request_seeds[i]`` when given (SPIN passes
      seeds derived from its shard seed), else :func:`request_seed` (``seed``, i). A prompt's sample therefore does
      not depend on batching or on the other prompts.
    * Stops at the same end-of-sequence ids as the HF path (the model's generation config and the tokenizer);
      outputs are decoded with the model's own tokenizer, without the EOS, and ``truncated`` means no EOS within
      ``max_new_tokens``.
    * Safetensors only, no remote code. A LoRA adapter directory must be merged first (``tunesmith merge``).
    """
    from types import SimpleNamespace

    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise UserError("backend 'vllm': the vllm package is not installed (pip install 'tunesmith[vllm]'; it needs "
                        "a GPU); use backend 'hf'") from None
    if (Path(model_path) / "adapter_config.json").exists():
        raise UserError(f"{model_path}: a LoRA adapter; backend 'vllm' needs a whole model (tunesmith merge --adapter "
                        f"{model_path} --output DIR)")
    if request_seeds is not None and len(request_seeds) != len(prompt_ids):
        raise ValueError(f"request_seeds has {len(request_seeds)} seeds for {len(prompt_ids)} prompts")
    for i, p in enumerate(prompt_ids):
        if not p:
            raise UserError(f"prompt {i} is empty (no tokens)")
    if tokenizer is None:
        from tunesmith.models import load_tokenizer

        tokenizer = load_tokenizer(model_path)
    try:
        from transformers import GenerationConfig

        gen_config = GenerationConfig.from_pretrained(model_path)
    except OSError:  # no generation_config.json: the tokenizer's EOS only
        gen_config = None
    eos = _eos_ids(SimpleNamespace(generation_config=gen_config), tokenizer)

    if request_seeds is None:
        request_seeds = [None if seed is None else request_seed(seed, i) for i in range(len(prompt_ids))]
    common = dict(max_tokens=max_new_tokens, min_tokens=min_new_tokens, repetition_penalty=repetition_penalty,
                  stop_token_ids=eos, temperature=temperature if do_sample else 0.0,
                  top_p=top_p if do_sample else 1.0, top_k=(top_k or -1) if do_sample else -1)
    params = [SamplingParams(**common, seed=s) for s in request_seeds]
    llm = LLM(model=model_path, tokenizer=model_path, seed=seed or 0, dtype=dtype, load_format="safetensors",
              trust_remote_code=False)
    outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], params)
    results = []
    for o in outs:
        ids = list(o.outputs[0].token_ids)
        stopped = bool(ids) and ids[-1] in eos
        kept = ids[:-1] if stopped else ids
        results.append({"output": tokenizer.decode(kept, skip_special_tokens=True), "output_ids": kept,
                        "new_tokens": len(ids), "truncated": o.outputs[0].finish_reason == "length" and not stopped})
    return results


# ---------------------------------------------------------------- CLI

@dataclass
class GenerateConfig:
    model_name_or_path: str = field("", "model directory (trained by tunesmith, or any "
                                         "causal LM)")
    prompts: str | list = field("", "prompts in any SFT format: a file (json/jsonl/csv/"
                                    "parquet), a pipe, pkg:PACKAGE/path, a hub dataset, "
                                    "or a list of them; answers, if present, become "
                                    "'reference'")
    output: str = field("", "output JSONL (alpaca_eval compatible)")
    dataset_split: str = field("train", "split, for a hub dataset")
    dataset_format: str = field("auto", "auto, alpaca, prompt_completion, messages, "
                                        "sharegpt")
    template: str = field("", "prompt template (default: the one the model was saved "
                              "with; auto for a model without one)")
    generator: str = field("", "name written in the 'generator' field (default: the "
                               "model directory's name)")
    backend: Literal["hf", "vllm"] = field("hf", "hf (transformers) or vllm (GPU)")
    batch_size: int = field(32, "prompts per batch (length-sorted, so padding stays small)")
    max_new_tokens: int = field(256, "generation budget per prompt")
    do_sample: bool = field(False, "sample instead of greedy decoding")
    temperature: float = field(1.0, "sampling temperature")
    top_p: float = field(1.0, "nucleus sampling")
    top_k: int = field(0, "top-k sampling (0: off)")
    repetition_penalty: float = field(1.0, "the NEFTune paper uses 1.2 with greedy")
    min_new_tokens: int = field(0, "block EOS until this many new tokens (Table 5)")
    prompt_suffix: str = field("", "text appended to every prompt, after a space "
                                   "unless it starts with whitespace (Table 5: ask for "
                                   "longer answers)")
    seed: int = field(0, "random seed (sampling)")
    limit: int = field(0, "only the first N prompts (0: all)")
    dtype: str = field("float32", "float32, bfloat16, float16")
    overwrite: bool = field(False, "replace an existing output file that this command "
                                   "did not write (never an input, never a run's own file)")

    def __post_init__(self):
        from tunesmith.data.source import check_sources
        from tunesmith.io import resolve_path
        from tunesmith.rundir import check_output_file

        for key in ("model_name_or_path", "prompts", "output"):
            if not getattr(self, key):
                raise UserError(f"'{key}' is required")
        self.model_name_or_path = resolve_path(self.model_name_or_path)
        check_sources(self.prompts, "prompts", weights=False)
        check_output_file(self.output, "output", command="generate", overwrite=self.overwrite,
                          inputs={"prompts": self.prompts, "model_name_or_path": self.model_name_or_path})
        check_decoding(self.temperature, self.top_p, self.top_k, self.repetition_penalty, self.min_new_tokens)
        if self.batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.limit < 0:
            raise UserError(f"limit must be >= 0 (0 = all), got {self.limit}")
        from tunesmith import checks

        checks.seed("seed", self.seed)
        if self.do_sample and self.temperature == 0:
            log.warning("note: temperature 0 means greedy decoding; sampling is off (do_sample: false is recorded)")
            self.do_sample = False

    def decoding(self) -> dict:
        d = asdict(self)
        return {k: d[k] for k in DECODING_KEYS} | {"prompt_suffix": self.prompt_suffix, "backend": self.backend}


def prompt_sources(cfg: GenerateConfig) -> list:
    """The sources of ``cfg.prompts``, resolved once (the one data entry)."""
    from tunesmith.data.source import open_sources

    return open_sources(cfg.prompts, split=cfg.dataset_split, dataset_format=cfg.dataset_format, key="prompts")


def prompt_examples(cfg: GenerateConfig, sources: list | None = None) -> list:
    """The prompts of ``cfg.prompts`` as examples (read and checked before any model is loaded; with ``limit``, no
    further than the first N)."""
    from tunesmith.data.source import read_examples

    return read_examples(cfg.prompts, require_response=False, limit=cfg.limit or None,
                         sources=sources or prompt_sources(cfg))


def prompt_rows(cfg: GenerateConfig, tokenizer, template, examples: list | None = None
                ) -> tuple[list[list[int]], list[dict]]:
    """Encode every prompt of ``cfg.prompts`` (or ``examples``) with ``template``; returns (token ids, row
    metadata)."""
    from tunesmith.data.tokenize import encode_prompt

    examples = prompt_examples(cfg) if examples is None else examples
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
    from tunesmith.data.source import model_template
    from tunesmith.io import atomic_write_jsonl
    from tunesmith.models import load_model_and_tokenizer, load_tokenizer

    settings = {k: getattr(cfg, k) for k in DECODING_KEYS}
    sources = prompt_sources(cfg)
    examples = prompt_examples(cfg, sources)
    if cfg.backend == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise UserError("backend 'vllm': the vllm package is not installed (pip install 'tunesmith[vllm]'; it "
                            "needs a GPU); use backend 'hf'") from None
        model, tokenizer = None, load_tokenizer(cfg.model_name_or_path)
    else:
        model, tokenizer = load_model_and_tokenizer(cfg.model_name_or_path, dtype=cfg.dtype)
    template = model_template(cfg.template, cfg.model_name_or_path, tokenizer, sources)
    ids, meta = prompt_rows(cfg, tokenizer, template, examples)
    if cfg.backend == "vllm":
        outs = generate_vllm(cfg.model_name_or_path, ids, **settings)
    else:
        outs = generate(model, tokenizer, ids, batch_size=cfg.batch_size, progress=True, **settings)
    generator = cfg.generator or Path(cfg.model_name_or_path.rstrip("/")).name
    decoding = cfg.decoding() | {"template": template.spec()}
    rows = [m | {"output": o["output"], "generator": generator, "truncated": o["truncated"],
                 "new_tokens": o["new_tokens"], "decoding": decoding} for m, o in zip(meta, outs)]
    atomic_write_jsonl(cfg.output, rows, command="generate")
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
