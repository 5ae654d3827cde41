"""What the self-test trains on, made on the spot and offline: randomly initialised Llama models built from a config
(with the tokenizer shipped with tunesmith's demo model), synthetic prompt/completion data, and the sizes of the GPU
form and of the CPU form (``--quick``)."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

SYLLABLES = "ba ce di fo gu ha je ki lo mu na pe qui ro su ta ve wi xo yu za bre cla dro fle gri plo sta tri vo".split()
ENDINGS = "n r s t l m k".split() + [""] * 4


@dataclass(frozen=True)
class Arch:
    """A Llama architecture (tied embeddings, as Llama 3.2 1B)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    max_positions: int = 4096


@dataclass(frozen=True)
class Sizes:
    """Model and data sizes of one form of the self-test."""

    sft: Arch  # check 2 (and the plan of check 7): ~1B on a GPU
    sft_seq: int
    sft_batch: int
    sft_warmup: int  # optimizer steps left out of the timing
    sft_steps: int  # timed optimizer steps
    small: Arch  # checks 3-6, 8, 9
    examples: int  # records in the small checks' data file
    pack_examples: int  # check 3
    pack_lengths: tuple[int, int]
    pack_row: int
    lean: Arch  # check 5: vocabulary 152,064
    lean_tokens: int
    neftune_steps: int
    lora_steps: int
    accelerate_steps: int
    spin_prompts: int
    spin_new_tokens: int


TOKENIZER_VOCAB = 2353  # the demo tokenizer's size; every model's vocabulary is at least this

GPU = Sizes(sft=Arch(2048, 8192, 16, 32, 8, 128256), sft_seq=2048, sft_batch=4, sft_warmup=3, sft_steps=10,
            small=Arch(512, 1408, 4, 8, 4, 32000), examples=64, pack_examples=24, pack_lengths=(64, 1024),
            pack_row=2048, lean=Arch(512, 1024, 1, 8, 4, 152064), lean_tokens=2048, neftune_steps=3, lora_steps=8,
            accelerate_steps=4, spin_prompts=16, spin_new_tokens=64)
QUICK = Sizes(sft=Arch(64, 128, 2, 4, 2, 2560, 512), sft_seq=128, sft_batch=2, sft_warmup=1, sft_steps=2,
              small=Arch(64, 128, 2, 4, 2, 2560, 512), examples=12, pack_examples=10, pack_lengths=(8, 40),
              pack_row=64, lean=Arch(64, 128, 1, 4, 2, 152064, 512), lean_tokens=128, neftune_steps=2,
              lora_steps=4, accelerate_steps=2, spin_prompts=4, spin_new_tokens=8)


def words(rng: random.Random, n: int) -> str:
    """``n`` made-up words (two or three syllables each), as sentences."""
    out = []
    for i in range(n):
        w = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) + rng.choice(ENDINGS)
        out.append(w.capitalize() if i % 9 == 0 else w)
    return " ".join(out) + "."


def records(n: int, prompt_words: tuple[int, int], completion_words: tuple[int, int], seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": words(rng, rng.randint(*prompt_words)), "completion": words(rng, rng.randint(*completion_words))}
            for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def tokenizer():
    """The byte-level BPE tokenizer shipped with tunesmith's demo model (has bos, eos and a pad token)."""
    from transformers import AutoTokenizer

    from tunesmith.demo.base import BASE_DIR

    return AutoTokenizer.from_pretrained(BASE_DIR)


def build_model(path: Path | None, arch: Arch, dtype: str = "float32", device: str = "cpu", seed: int = 0):
    """A randomly initialised LlamaForCausalLM of ``arch`` in ``dtype``, its weights initialised on ``device`` (fast on
    a GPU for the ~1B model). With a ``path``: saved there (safetensors) with the demo tokenizer, and its parameter
    count returned; without: the model itself."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = tokenizer()
    if arch.vocab < len(tok):
        raise ValueError(f"vocabulary {arch.vocab} is smaller than the tokenizer's {len(tok)}")
    config = LlamaConfig(vocab_size=arch.vocab, hidden_size=arch.hidden, intermediate_size=arch.intermediate,
                         num_hidden_layers=arch.layers, num_attention_heads=arch.heads,
                         num_key_value_heads=arch.kv_heads, max_position_embeddings=arch.max_positions,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    if path is None:
        return model
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    del model
    return n
