"""Shared helpers for the bench/ scripts: an offline workspace holding a Llama-style model built from a config, a
tokenizer trained on the spot, a synthetic instruction dataset of varied lengths, peak-memory probes and the
throughput window read from Trainer logs.

Nothing here is imported by tunesmith itself; the scripts run from a checkout (``python bench/bench_sft.py``).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing
import transformers  # noqa: E402

transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars would interleave with the table

PAD, BOS, EOS = "<|pad|>", "<s>", "</s>"
TEMPLATE = "instruction_response"  # "### Instruction: {prompt}\n\n### Response: {response}"


@dataclass(frozen=True)
class Size:
    """Model and data shape of one benchmark size."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    examples: int
    max_length: int
    batch_size: int


# "full": ~10M parameters (Llama layout, untied embeddings); "quick": a smoke-test model that runs in seconds.
SIZES = {
    "full": Size(vocab=4096, hidden=256, intermediate=688, layers=11, heads=8, kv_heads=4, examples=1200,
                 max_length=256, batch_size=8),
    "quick": Size(vocab=512, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, examples=96,
                  max_length=64, batch_size=4),
}

_SYLLABLES = ("ka ri to me na lo su vi de pa mo ne ta ru si fo ga li be zu ho ye ma ko ti la nu re po wa "
              "dar sen vol mir tas kel bor fin gal hun").split()
_TASKS = ("Explain", "Summarize", "List", "Describe", "Compare", "Translate", "Rewrite", "Classify", "Answer")


def _lexicon(rng: random.Random, n: int = 4000) -> list[str]:
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))))
    return sorted(words)


@functools.lru_cache(maxsize=4)
def _zipf_cum_weights(n: int) -> list[float]:
    total, out = 0.0, []
    for rank in range(n):
        total += 1.0 / (rank + 3)
        out.append(total)
    return out


def _sentence(rng: random.Random, lexicon: list[str], n_words: int) -> str:
    # Zipf-like word frequencies (weight 1 / (rank + 3)), so BPE sees frequent and rare words as in real text
    words = rng.choices(lexicon, cum_weights=_zipf_cum_weights(len(lexicon)), k=n_words)
    out, i = [], 0
    while i < len(words):
        k = rng.randint(4, 12)
        chunk = words[i:i + k]
        out.append(chunk[0].capitalize() + (" " + " ".join(chunk[1:]) if len(chunk) > 1 else "") + ".")
        i += k
    return " ".join(out)


def make_records(n: int, seed: int = 0, scale: float = 1.0) -> list[dict]:
    """``n`` prompt/completion records with varied lengths: short questions to long prompts and long answers.

    ``scale`` shrinks every length (the quick size). About a tenth of the full-size examples exceed 256 tokens, so
    truncation is exercised too.
    """
    rng = random.Random(seed)
    lexicon = _lexicon(random.Random(1234))
    rng.shuffle(lexicon)
    rows = []
    for _ in range(n):
        p_words = max(2, int(rng.choice([rng.randint(3, 15), rng.randint(15, 60), rng.randint(40, 110)]) * scale))
        r_words = max(1, int(rng.choice([rng.randint(2, 10), rng.randint(10, 50), rng.randint(50, 150)]) * scale))
        prompt = f"{rng.choice(_TASKS)}: {_sentence(rng, lexicon, p_words)}"
        rows.append({"prompt": prompt, "completion": _sentence(rng, lexicon, r_words)})
    return rows


def render_for_trl(rec: dict) -> dict:
    """The same record with tunesmith's ``instruction_response`` template applied as text, for TRL's
    prompt/completion path (TRL appends the EOS token to the completion, as tunesmith does)."""
    return {"prompt": f"### Instruction: {rec['prompt']}\n\n### Response:", "completion": " " + rec["completion"]}


def build_tokenizer(path: Path, records: list[dict], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [r["prompt"] + "\n" + r["completion"] for r in records]
    corpus += ["### Instruction: ### Response:"] * 50
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    fast.save_pretrained(path)
    return fast


def build_model(path: Path, vocab_size: int, size: Size, seed: int = 0) -> int:
    """Save a randomly initialised LlamaForCausalLM (safetensors) to ``path``; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=size.hidden, intermediate_size=size.intermediate,
                         num_hidden_layers=size.layers, num_attention_heads=size.heads,
                         num_key_value_heads=size.kv_heads, max_position_embeddings=1024, bos_token_id=0,
                         eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


@dataclass
class Workspace:
    root: Path
    model_dir: str
    data_file: str  # tunesmith input: raw prompt/completion JSONL
    records: list[dict]
    size: Size
    n_params: int


def make_workspace(root: Path, size_name: str, seed: int = 0) -> Workspace:
    size = SIZES[size_name]
    records = make_records(size.examples, seed, scale=1.0 if size_name == "full" else 0.25)
    model_dir = root / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(model_dir, records, size.vocab)
    n_params = build_model(model_dir, len(tok), size, seed)
    data_file = root / "train.jsonl"
    with open(data_file, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return Workspace(root, str(model_dir), str(data_file), records, size, n_params)


def tunesmith_config(ws: Workspace, out: str, steps: int, log_every: int, **over) -> dict:
    """The dict config of a tunesmith run: float32 on CPU, nothing saved mid-run, nothing reported."""
    cfg = dict(model_name_or_path=ws.model_dir, dataset=ws.data_file, dataset_format="prompt_completion",
               template=TEMPLATE, output_dir=out, max_length=ws.size.max_length,
               per_device_train_batch_size=ws.size.batch_size, max_steps=steps, learning_rate=1e-4,
               lr_scheduler_type="constant", warmup_steps=0, logging_steps=log_every, save_strategy="no",
               report_to="none", train_loss_eval_samples=0, seed=0, use_cpu=True, dtype="float32",
               disable_tqdm=True, dataloader_num_workers=0)
    cfg.update(over)
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Measurement helpers


def window(logs: list[dict], start_step: int, end_step: int) -> tuple[float, int]:
    """(seconds, non-padding tokens) between the Trainer log events at ``start_step`` and ``end_step``.

    Each Trainer log event (with ``include_num_input_tokens_seen``) carries ``train_runtime`` (seconds since the
    training loop started) and ``num_input_tokens_seen``; the difference excludes setup and the warm-up steps.
    """
    by_step = {e["step"]: e for e in logs if "train_runtime" in e and "num_input_tokens_seen" in e
               and "train_loss" not in e}
    a, b = by_step[start_step], by_step[end_step]
    return b["train_runtime"] - a["train_runtime"], b["num_input_tokens_seen"] - a["num_input_tokens_seen"]


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class PeakRSS:
    """Resident-set high-water mark of THIS process over a phase, in MiB (Linux /proc).

    On entry: freed heap is handed back to the OS (malloc_trim) and the kernel's high-water mark VmHWM is reset
    (writing 5 to /proc/self/clear_refs); on exit ``peak`` is VmHWM, i.e. the largest RSS reached during the phase,
    and ``start`` the RSS when it began (libraries already imported, earlier phases' leftovers included).
    """

    def __enter__(self):
        import gc

        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.resettable = True
        except OSError:
            self.resettable = False
        self.start = _status_kb("VmRSS") / 1024
        return self

    def __exit__(self, *exc):
        self.peak = _status_kb("VmHWM") / 1024
        return False

    def describe(self) -> str:
        note = "" if self.resettable else " (VmHWM not resettable here: process-wide peak)"
        grow = self.peak - self.start
        return f"peak RSS {self.peak:7.0f} MiB (phase start {self.start:5.0f} MiB, +{grow:5.0f}){note}"


@contextlib.contextmanager
def quiet(log_path: Path):
    """Send the libraries' prints and progress bars (Trainer log dicts, dataset maps) to ``log_path``."""
    with open(log_path, "a", encoding="utf-8") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


def median(xs):
    return statistics.median(xs)


def threads_warning() -> str:
    """A line to print when torch uses several threads: CPU time then adds up every thread's time."""
    import torch

    if torch.get_num_threads() == 1:
        return ""
    return (f"NOTE: torch uses {torch.get_num_threads()} threads; CPU-time figures add up all threads. For comparable "
            "figures run with OMP_NUM_THREADS=1.\n")


def threads_note() -> str:
    import torch

    return (f"torch {torch.__version__}, intra-op threads {torch.get_num_threads()}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
