"""Reading generation files: JSONL (``tunesmith generate``) or a JSON list (alpaca_eval's model_outputs.json).

Every row needs ``instruction`` and ``output`` (strings); ``generator`` and ``input`` (Alpaca's input, written by
``tunesmith generate``) are optional. A prompt is the pair (instruction, input): rows that share an instruction but
not an input are different prompts."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import UserError, at


@dataclass
class Generation:
    instruction: str
    output: str
    generator: str
    loc: str
    row: dict
    input: str = ""

    @property
    def key(self) -> tuple[str, str]:
        """What identifies the prompt: instruction and input."""
        return self.instruction, self.input

    @property
    def prompt(self) -> str:
        """The instruction as a reader (or a judge) must see it: with the Alpaca input below it, as AlpacaEval shows
        Alpaca prompts."""
        return f"{self.instruction}\n\n{self.input}" if self.input else self.instruction


def read_generations(path: str | Path) -> list[Generation]:
    """The rows of a generation file, read through the data entry (JSONL, a JSON list, or a pipe); one-line errors
    name the file, line (or row) and field."""
    from tunesmith.data.source import open_source

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: generation file not found")
    out = []
    for record in open_source(str(path), key="generations").records():
        row, loc = record.data, record.loc
        for key in ("instruction", "output"):
            if key not in row:
                raise UserError(f"{at(loc, field=key)}: missing")
            if not isinstance(row[key], str):
                raise UserError(f"{at(loc, field=key)}: expected a string, got {type(row[key]).__name__}")
        extra = row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise UserError(f"{at(loc, field='input')}: expected a string, got {type(extra).__name__}")
        out.append(Generation(row["instruction"], row["output"], str(row.get("generator") or path.stem), loc, row,
                              extra or ""))
    return out


def pair_generations(a: list[Generation], b: list[Generation]) -> list[tuple[Generation, Generation]]:
    """Match the two sides prompt by prompt (by instruction and input, duplicates in order). Any prompt present on
    one side only is an error naming its location."""
    pool: dict[tuple[str, str], list[Generation]] = {}
    for g in b:
        pool.setdefault(g.key, []).append(g)
    pairs = []
    for g in a:
        matches = pool.get(g.key)
        if not matches:
            other = Path(b[0].loc.rsplit(":", 1)[0]).name
            raise UserError(f"{g.loc}: field 'instruction': prompt not found in {other} "
                            f"({g.instruction[:60]!r}); both files must hold the same prompts")
        pairs.append((g, matches.pop(0)))
    left = [g for gs in pool.values() for g in gs]
    if left:
        other = Path(a[0].loc.rsplit(":", 1)[0]).name
        raise UserError(f"{left[0].loc}: field 'instruction': prompt not found in {other} "
                        f"({left[0].instruction[:60]!r}); both files must hold the same prompts")
    return pairs
