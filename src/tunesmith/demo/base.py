"""The shipped tiny base model: locate it, verify its checksums, load it, and probe what it knows.

The checkpoint in ``base_model/`` is produced by ``scripts/pretrain_demo_base.py`` (see ``PROVENANCE.md`` there).
``SHA256SUMS.txt`` lists every file with its sha256; :func:`verify` refuses a checkpoint with a missing or altered
file, so a truncated download or a bad merge fails with one clear line instead of a confusing load error.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tunesmith.errors import UserError

BASE_DIR = Path(__file__).parent / "base_model"
MANIFEST = "SHA256SUMS.txt"  # `sha256sum -c` format; *.txt ships as package data


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    """Write ``SHA256SUMS.txt`` (``sha256  name`` lines, sorted) for every other file in ``directory``."""
    from tunesmith.io import atomic_write_text

    directory = Path(directory)
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))
    atomic_write_text(directory / MANIFEST, "".join(f"{sha256_file(p)}  {p.name}\n" for p in files))


def verify(directory: str | Path = BASE_DIR) -> Path:
    """Check every file listed in the manifest exists and matches its sha256. Returns the directory."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise UserError(f"{manifest}: demo base model missing (no checksum manifest); reinstall tunesmith or rerun "
                        f"scripts/pretrain_demo_base.py")
    lines = manifest.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise UserError(f"{manifest}: checksum manifest is empty")
    for i, line in enumerate(lines, 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name or "/" in name or name.startswith("."):
            raise UserError(f"{manifest}:{i}: malformed manifest line (expected 'sha256  filename')")
        path = directory / name
        if not path.is_file():
            raise UserError(f"{path}: demo base model file missing (listed in {MANIFEST})")
        if sha256_file(path) != digest:
            raise UserError(f"{path}: checksum mismatch, the demo base model is corrupted; reinstall tunesmith or "
                            f"rerun scripts/pretrain_demo_base.py")
    return directory


def provenance(directory: str | Path = BASE_DIR) -> dict:
    path = Path(directory) / "provenance.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: demo base model provenance missing") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def load_base(directory: str | Path = BASE_DIR, dtype: str = "float32"):
    """Verify and load the base model: returns ``(model, tokenizer, world)`` with the world the model was taught."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from tunesmith.demo.world import World

    directory = verify(directory)
    info = provenance(directory)
    world = World(seed=info["world"]["seed"], n_people=info["world"]["n_people"])
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = LlamaForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype))
    model.eval()
    return model, tokenizer, world


def knowledge_probe(model, tokenizer, world, people=None, batch_size: int = 128, max_new_tokens: int = 8) -> dict:
    """Greedy completion probe: for each person and attribute, complete the prompt (e.g. "<name> was born in the
    city of") and count it right when the continuation starts with the true value followed by a word boundary.

    Returns ``{"overall": acc, "per_attribute": {attr: acc}, "n": count}``.
    """
    import torch

    from tunesmith.demo.world import ATTRIBUTES, PROBES

    people = world.people if people is None else people
    items = [(a, PROBES[a].format(n=p.name), str(getattr(p, a))) for p in people for a in ATTRIBUTES]
    hits: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            enc = tokenizer([prompt for _, prompt, _ in chunk], return_tensors="pt", padding=True)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for (attr, _, value), text in zip(chunk, texts):
                text = text.strip()
                ok = text.startswith(value) and (len(text) == len(value) or not text[len(value)].isalnum())
                hits[attr].append(ok)
    finally:
        tokenizer.padding_side = side
    per = {a: sum(h) / len(h) for a, h in hits.items() if h}
    total = sum(sum(h) for h in hits.values())
    n = sum(len(h) for h in hits.values())
    return {"overall": total / n if n else 0.0, "per_attribute": per, "n": n}


_JUDGE = None


def fact_judge(instruction: str, output_1: str, output_2: str) -> str:
    """The fact judge of the shipped base model's world, as a python judge for ``tunesmith judge``:
    ``--judge python --python_judge tunesmith.demo.base:fact_judge``. Returns ``"1"``, ``"2"`` or ``"tie"``."""
    global _JUDGE
    if _JUDGE is None:
        from tunesmith.demo.world import FactJudge, World

        info = provenance(verify())
        _JUDGE = FactJudge(World(seed=info["world"]["seed"], n_people=info["world"]["n_people"]))
    return _JUDGE(instruction, output_1, output_2)
