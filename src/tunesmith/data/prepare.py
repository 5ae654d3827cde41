"""From a dataset source to tokenized, masked examples plus the audit summary every run logs."""
from __future__ import annotations

from dataclasses import dataclass, field

from tunesmith.data.formats import Example, to_examples
from tunesmith.data.load import load_records
from tunesmith.data.templates import Template
from tunesmith.data.tokenize import IGNORE, encode
from tunesmith.errors import UserError


@dataclass
class DataSummary:
    source: str
    examples: int = 0
    kept: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    eos_trained: int = 0
    doubled_bos: int = 0
    dropped: list[str] = field(default_factory=list)  # locations of examples with nothing left to train

    @property
    def trained_fraction(self) -> float:
        return self.trained_tokens / self.tokens if self.tokens else 0.0

    def lines(self) -> list[str]:
        dropped = f"{len(self.dropped)}" + (f" (first: {', '.join(self.dropped[:3])})" if self.dropped else "")
        return [
            f"data {self.source}: {self.examples} examples, {self.kept} kept, {dropped} dropped with no trainable token",
            f"  tokens {self.tokens}, trained {self.trained_tokens} ({100 * self.trained_fraction:.1f}%), "
            f"truncated {self.truncated}, EOS trained in {self.eos_trained}/{self.kept}, doubled BOS in "
            f"{self.doubled_bos}",
        ]


def load_examples(source: str, dataset_format: str = "auto", split: str = "train",
                  require_response: bool = True) -> list[Example]:
    return to_examples(load_records(source, split), dataset_format, require_response)


def tokenize_examples(examples: list[Example], tokenizer, template: Template, max_length: int,
                      train_on_prompt: bool = False, source: str = "") -> tuple[list[dict], DataSummary]:
    summary = DataSummary(source=source, examples=len(examples))
    out = []
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for ex in examples:
        enc = encode(tokenizer, template, ex, max_length, train_on_prompt, return_full_length=True)
        if enc is None:
            summary.dropped.append(ex.loc)
            continue
        ids, labels = enc["input_ids"], enc["labels"]
        summary.truncated += enc.pop("full_length") > max_length
        summary.tokens += len(ids)
        summary.trained_tokens += sum(1 for x in labels if x != IGNORE)
        summary.eos_trained += eos is not None and eos in [x for x in labels if x != IGNORE]
        summary.doubled_bos += bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos
        out.append(enc)
    summary.kept = len(out)
    if not out:
        raise UserError(f"{source}: no example has a trainable token left (all {len(examples)} are empty or "
                        f"truncated away at max_length={max_length})")
    return out, summary
