"""Preference pairs: records in the shapes TRL users have -> (conversation up to the answer, chosen, rejected) ->
token ids of the prompt and of both answers, on memory-mapped Arrow.

Shapes (``dataset_format``; ``auto`` detects from the first record):

  preference      ``prompt`` / ``chosen`` / ``rejected`` as text, or as conversations: ``prompt`` a list of messages
                  (multi-turn allowed, ending with the user), ``chosen`` / ``rejected`` one assistant message each
  implicit        ``chosen`` / ``rejected`` only, two whole conversations sharing their prefix (the prompt), or two
                  texts sharing their start (cut at the start of the word where they first differ)
  ultrafeedback   UltraFeedback-binarized: ``prompt`` as text and ``chosen`` / ``rejected`` as whole conversations
                  (user turn included); the prompt must be the conversations' last user message
  hh              Anthropic HH: ``chosen`` / ``rejected`` texts of ``\\n\\nHuman: ...\\n\\nAssistant: ...``
                  turns sharing every turn but the last answer

Every record becomes a :class:`Pair`: the conversation as an :class:`~tunesmith.data.formats.Example` whose last
turn has no response yet, and the two answers. Its tokens come from the same template segments SFT trains on, so
``prompt_ids`` is token for token what generation would be given and each answer's ids end as the template ends an
answer (EOS, or the chat template's end-of-turn text). A pair whose chosen answer equals its rejected one teaches
nothing (its loss has no gradient): such pairs are counted and dropped, as are pairs whose prompt leaves no room for
an answer in ``max_length``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from tunesmith.data.formats import Example, Turn, _chat
from tunesmith.data.load import Record
from tunesmith.errors import UserError

PREFERENCE_FORMATS = ("preference", "implicit", "ultrafeedback", "hh")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")

# keep codes of the tokenized rows
KEPT, IDENTICAL, PROMPT_TOO_LONG = 0, 1, 2


@dataclass
class Pair:
    example: Example  # the conversation; its last turn's response is None (the answer goes there)
    chosen: str
    rejected: str

    @property
    def loc(self) -> str:
        return self.example.loc

    def with_answer(self, answer: str) -> Example:
        ex = self.example
        return Example(turns=ex.turns[:-1] + [Turn(ex.turns[-1].prompt, answer)], system=ex.system, input=ex.input,
                       loc=ex.loc)


def _is_messages(value) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def detect_preference_format(data: dict, loc: str) -> str:
    keys = set(data)
    if not {"chosen", "rejected"} <= keys:
        raise UserError(f"{loc}: a preference pair needs 'chosen' and 'rejected' (and 'prompt', or a prompt shared "
                        f"by both), got keys {sorted(keys)}")
    chosen = data["chosen"]
    if "prompt" in keys and data["prompt"] is not None:
        if isinstance(data["prompt"], str) and _is_messages(chosen) and any(
                m.get("role") in ("user", "human") for m in chosen if isinstance(m, dict)):
            return "ultrafeedback"
        return "preference"
    if isinstance(chosen, str) and _HH_TURN.search(chosen) and chosen.lstrip("\n").startswith("Human:"):
        return "hh"
    return "implicit"


def _answer(value, loc: str, key: str, conversational: bool) -> str:
    """The answer text of ``chosen`` / ``rejected``: a string, or exactly one assistant message."""
    if not conversational:
        if not isinstance(value, str):
            raise UserError(f"{loc}: field '{key}' must be a string (the prompt is text), got "
                            f"{type(value).__name__}")
        return value
    if isinstance(value, dict):
        value = [value]
    if not _is_messages(value):
        raise UserError(f"{loc}: field '{key}' must be a list of messages (the prompt is a conversation)")
    if len(value) != 1 or str(value[0].get("role", "")).lower() not in ("assistant", "gpt", "model"):
        raise UserError(f"{loc}: field '{key}' must hold exactly one assistant message (the answer), got "
                        f"{len(value)} message(s) starting with role {value[0].get('role')!r}")
    content = value[0].get("content")
    if not isinstance(content, str):
        raise UserError(f"{loc}: field '{key}[0].content' must be a string")
    return content


def _conversation_prompt(messages, loc: str, key: str) -> Example:
    ex = _chat(messages, loc, key, "role", "content", require_response=False)
    if ex.turns[-1].response is not None:
        raise UserError(f"{loc}: field '{key}' must end with a user message (the answer comes after it)")
    return ex


def _split_conversations(chosen, rejected, loc: str) -> tuple[list, str, str]:
    """(shared prefix, chosen answer, rejected answer) of two whole conversations."""
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not _is_messages(value):
            raise UserError(f"{loc}: field '{key}' must be a list of role/content messages")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == len(chosen) == len(rejected):
        n -= 1  # identical conversations: the last message is the (identical) answer; the pair is dropped later
    prefix = chosen[:n]
    return prefix, _answer(chosen[n:], loc, "chosen", True), _answer(rejected[n:], loc, "rejected", True)


def _hh_turns(text: str, loc: str, key: str) -> list[tuple[str, str]]:
    if not isinstance(text, str):
        raise UserError(f"{loc}: field '{key}' must be a string")
    text = text if text.startswith("\n\n") else "\n\n" + text.lstrip("\n")
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise UserError(f"{loc}: field '{key}' must start with '\\n\\nHuman:' (Anthropic HH turns)")
    turns = list(zip(parts[1::2], parts[2::2]))
    roles = [r for r, _ in turns]
    if not turns or roles[-1] != "Assistant" or any(r == roles[i + 1] for i, r in enumerate(roles[:-1])):
        raise UserError(f"{loc}: field '{key}': Human and Assistant turns must alternate and end with the Assistant's "
                        "answer")
    return turns


def _hh(data: dict, loc: str) -> Pair:
    chosen, rejected = _hh_turns(data["chosen"], loc, "chosen"), _hh_turns(data["rejected"], loc, "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise UserError(f"{loc}: 'chosen' and 'rejected' differ before their last Assistant turn (they must share "
                        "the conversation and differ only in the answer)")
    messages = [{"role": "user" if r == "Human" else "assistant", "content": c} for r, c in chosen[:-1]]
    return Pair(_conversation_prompt(messages, loc, "chosen"), chosen[-1][1], rejected[-1][1])


def _implicit_text(chosen: str, rejected: str, loc: str) -> tuple[str, str, str]:
    """(prompt, chosen answer, rejected answer) of two texts sharing their start: cut before the whitespace that
    starts the word where they first differ, so both answers are whole words (tokenized as the text is; TRL cuts
    inside the word: "the sky is bl" + "ue" / "ack"). Text without whitespace before that point is cut where the
    two differ."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    inside = n > 0 and not chosen[n - 1].isspace() and any(n < len(t) and not t[n].isspace()
                                                           for t in (chosen, rejected))
    if inside or (n and chosen[n - 1].isspace()):
        start = max(chosen.rfind(c, 0, n) for c in " \t\n")  # the whitespace before the differing word
        n = start if start > 0 else n
    if n == 0:
        raise UserError(f"{loc}: 'chosen' and 'rejected' share no prompt (give a 'prompt' field)")
    return chosen[:n], chosen[n:], rejected[n:]


def to_pair(record: Record, fmt: str) -> Pair:
    """One record in shape ``fmt`` (see the module docstring) as a :class:`Pair`; one-line errors name file:line."""
    d, loc = record.data, record.loc
    for key in ("chosen", "rejected"):
        if d.get(key) is None:
            raise UserError(f"{loc}: field '{key}' is missing")
    if fmt in ("hh", "implicit") and d.get("prompt") is not None:  # the first record had none: read as implicit
        raise UserError(f"{loc}: field 'prompt' is set, but the data is read as {fmt} pairs (the prompt shared by "
                        "'chosen' and 'rejected'), as its first record has no prompt; give every record a 'prompt', "
                        "or none")
    if fmt == "hh":
        return _hh(d, loc)
    if fmt == "implicit":
        if isinstance(d["chosen"], str):
            if not isinstance(d["rejected"], str):
                raise UserError(f"{loc}: field 'rejected' must be a string like 'chosen'")
            prompt, chosen, rejected = _implicit_text(d["chosen"], d["rejected"], loc)
            return Pair(Example(turns=[Turn(prompt, None)], loc=loc), chosen, rejected)
        prefix, chosen, rejected = _split_conversations(d["chosen"], d["rejected"], loc)
        if not prefix:
            raise UserError(f"{loc}: 'chosen' and 'rejected' share no prompt messages (give a 'prompt' field)")
        return Pair(_conversation_prompt(prefix, loc, "chosen"), chosen, rejected)
    if fmt == "ultrafeedback":
        if not isinstance(d.get("prompt"), str):
            raise UserError(f"{loc}: field 'prompt' must be a string (UltraFeedback-binarized)")
        prefix, chosen, rejected = _split_conversations(d["chosen"], d["rejected"], loc)
        ex = _conversation_prompt(prefix, loc, "chosen")
        if ex.turns[-1].prompt.strip() != d["prompt"].strip():
            raise UserError(f"{loc}: field 'prompt' is not the last user message of 'chosen' / 'rejected'")
        return Pair(ex, chosen, rejected)
    if fmt == "preference":
        prompt = d.get("prompt")
        if prompt is None:
            raise UserError(f"{loc}: field 'prompt' is missing")
        if isinstance(prompt, str):
            ex = Example(turns=[Turn(prompt, None)], system=d.get("system") if isinstance(d.get("system"), str)
                         else None, loc=loc)
            return Pair(ex, _answer(d["chosen"], loc, "chosen", False), _answer(d["rejected"], loc, "rejected", False))
        ex = _conversation_prompt(prompt, loc, "prompt")
        return Pair(ex, _answer(d["chosen"], loc, "chosen", True), _answer(d["rejected"], loc, "rejected", True))
    raise UserError(f"unknown preference dataset_format '{fmt}' (choose auto, {', '.join(PREFERENCE_FORMATS)})")


def preference_format(dataset_format: str, first: Record) -> str:
    """The shape to read a preference set in: ``dataset_format``, or the one detected from the first record."""
    if dataset_format == "auto":
        return detect_preference_format(first.data, first.loc)
    if dataset_format not in PREFERENCE_FORMATS:
        raise UserError(f"dataset_format '{dataset_format}' is not a preference format (choose auto, "
                        f"{', '.join(PREFERENCE_FORMATS)})")
    return dataset_format


# ------------------------------------------------------------------------------------------------ tokens


def encode_pairs(tokenizer, template, pairs: list[Pair], max_length: int) -> list[dict]:
    """Token ids of each pair: ``prompt_ids`` (the generation prompt) and the answers' ``chosen_ids`` /
    ``rejected_ids`` (the tokens after the prompt in the training text, end-of-answer tokens included), untruncated,
    with ``keep``: KEPT, IDENTICAL (chosen = rejected) or PROMPT_TOO_LONG (no room for an answer in max_length)."""
    from tunesmith.data.tokenize import _tokens_batch

    examples = []
    for p in pairs:
        examples += [p.example, p.with_answer(p.chosen), p.with_answer(p.rejected)]
    encoded = _tokens_batch(tokenizer, template, examples, train_on_prompt=False)
    out = []
    for i, p in enumerate(pairs):
        (prompt, _), (chosen, _), (rejected, _) = encoded[3 * i:3 * i + 3]
        for full in (chosen, rejected):
            if full[:len(prompt)] != prompt:
                raise UserError(f"{p.loc}: template {template.spec()!r} renders the prompt differently from the "
                                "training text; it cannot be used for preference pairs")
        row = {"prompt_ids": prompt, "chosen_ids": chosen[len(prompt):], "rejected_ids": rejected[len(prompt):],
               "loc": p.loc}
        if row["chosen_ids"] == row["rejected_ids"]:
            row["keep"] = IDENTICAL
        elif len(prompt) >= max_length:
            row["keep"] = PROMPT_TOO_LONG
        else:
            row["keep"] = KEPT
        out.append(row)
    return out


@dataclass
class PairSummary:
    source: str
    records: int = 0
    kept: int = 0
    identical: int = 0
    prompt_too_long: int = 0
    truncated: int = 0  # kept pairs with an answer cut at max_length
    tokens: int = 0  # prompt + both answers, after truncation
    first_dropped: list[str] = field(default_factory=list)
    fingerprint: str = ""  # the cache key: the data's bytes, tokenizer, template and settings

    def lines(self) -> list[str]:
        first = f" (first: {', '.join(self.first_dropped[:3])})" if self.first_dropped else ""
        return [f"pairs {self.source}: {self.records} records, {self.kept} kept; dropped: {self.identical} with chosen "
                f"= rejected, {self.prompt_too_long} with no room for an answer{first}",
                f"  truncated {self.truncated}, tokens {self.tokens} (prompt + chosen + rejected)"]


# ------------------------------------------------------------------------------------------------ Arrow, cached

PAIR_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids"]


def _pair_schema():
    import pyarrow as pa

    from tunesmith.data.prepare import _example_schema

    return pa.schema(list(_example_schema()) + [pa.field("chosen", pa.string()), pa.field("rejected", pa.string())])


def _pair_row(p: Pair) -> dict:
    from tunesmith.data.prepare import _example_row

    return {**_example_row(p.example), "chosen": p.chosen, "rejected": p.rejected}


def _tokenize_pairs(batch: dict, tokenizer, template, max_length: int) -> dict:
    from tunesmith.data.prepare import row_examples

    pairs = [Pair(ex, c, r) for ex, c, r in zip(row_examples(batch), batch["chosen"], batch["rejected"])]
    rows = encode_pairs(tokenizer, template, pairs, max_length)
    out = {key: [r[key] for r in rows] for key in PAIR_COLUMNS + ["keep"]}
    out["tokens"], out["truncated"] = [], []
    for r in rows:
        n = len(r["prompt_ids"])
        room = max(max_length - n, 0)
        out["tokens"].append(n + min(len(r["chosen_ids"]), room) + min(len(r["rejected_ids"]), room))
        out["truncated"].append(int(n + max(len(r["chosen_ids"]), len(r["rejected_ids"])) > max_length))
    return out


def _pair_features():
    from datasets import Features, List, Value

    ids = List(Value("int32"))
    return Features({"loc": Value("string"), "prompt_ids": ids, "chosen_ids": ids, "rejected_ids": ids,
                     "keep": Value("int8"), "tokens": Value("int64"), "truncated": Value("int8")})


def keep_rows(column: str, kept_value, describe):
    """A ``finish`` for :meth:`tunesmith.data.source.DataSource.mapped`: writes the rows whose ``column`` equals
    ``kept_value`` to ``kept.arrow`` in the cache entry (when any row is dropped), so later reads need no index
    mapping; ``describe(table, kept, dropped)`` returns the manifest's ``summary`` dict (or raises UserError)."""

    def finish(dataset, build) -> dict:
        import numpy as np

        values = dataset.data.column(column).to_numpy(zero_copy_only=False)
        kept, dropped = np.flatnonzero(values == kept_value), np.flatnonzero(values != kept_value)
        summary = describe(dataset, kept, dropped)
        if len(dropped):
            dataset.select(kept).flatten_indices(cache_file_name=str(build / "kept.arrow"))
        return {"summary": summary, "kept_file": "kept.arrow" if len(dropped) else None}

    return finish


def kept_table(dataset, manifest: dict):
    """The kept rows of a table :func:`keep_rows` finished (memory-mapped)."""
    from pathlib import Path

    from datasets import Dataset

    if manifest.get("kept_file"):
        return Dataset.from_file(str(Path(manifest["entry"]) / manifest["kept_file"]))
    return dataset


def mix_tables(tables: list, sources: list, mixture: str, seed: int, columns: list[str], cache_dir=None):
    """The rows of ``tables`` (one per source) mixed as the data entry mixes token rows (``mixture``, ``seed``, each
    source's ``num_samples`` / ``weight``): one table taken whole is returned as it is; a mixture is written once to
    the cache (keyed by its tables and plan) and memory-mapped, so it joins the reference columns without a copy."""
    import hashlib
    import json
    import os
    import secrets

    import numpy as np
    from datasets import Dataset, concatenate_datasets

    from tunesmith.data.mixture import plan
    from tunesmith.data.source import cache_root

    src, row = plan([len(t) for t in tables], [s.spec for s in sources], mixture, seed)
    tables = [t.select_columns(columns) for t in tables]
    if len(tables) == 1 and len(row) == len(tables[0]) and bool((row == np.arange(len(row))).all()):
        return tables[0]
    offsets = np.cumsum([0] + [len(t) for t in tables])[:-1]
    indices = offsets[src] + row
    key = hashlib.sha256(json.dumps([[f["filename"] for f in t.cache_files] for t in tables] + [mixture, seed])
                         .encode() + indices.tobytes()).hexdigest()[:32]
    root = cache_root(cache_dir)
    path = root / f"mixture-{key}.arrow"
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        from tunesmith.rundir import temp_prefix

        # a name nobody has yet: datasets would take an existing (even empty) file there for a finished cache file
        tmp = str(root / f"{temp_prefix(path.name)}{secrets.token_hex(6)}.partial")
        try:
            concatenate_datasets(tables).select(indices).flatten_indices(cache_file_name=tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return Dataset.from_file(str(path))


def is_conversational(record: Record) -> bool:
    """Whether a preference record holds conversations (a chat template then renders it best)."""
    d = record.data
    return any(_is_messages(d.get(k)) for k in ("prompt", "chosen", "rejected")) or (
        isinstance(d.get("chosen"), str) and detect_preference_format(d, record.loc) == "hh")


def source_pairs(source, tokenizer, template, max_length: int, *, dataset_format: str = "auto",
                 num_proc: int | None = None, cache_dir=None):
    """The kept pairs of one :class:`~tunesmith.data.source.DataSource` (memory-mapped) and its
    :class:`PairSummary`; normalised and tokenized once and cached (by its bytes, the tokenizer, template and
    settings), through the data entry."""
    import numpy as np

    fmt = preference_format(dataset_format, source.first_record)
    tmpl = source.template(template, tokenizer)

    def to_row(record):
        return _pair_row(to_pair(record, fmt))

    def describe(table, kept, dropped):
        keep = table.data.column("keep").to_numpy()
        s = PairSummary(source=source.display, records=len(table), kept=len(kept),
                        identical=int((keep == IDENTICAL).sum()), prompt_too_long=int((keep == PROMPT_TOO_LONG).sum()),
                        truncated=int(np.asarray(table.data.column("truncated"))[kept].sum()),
                        tokens=int(np.asarray(table.data.column("tokens"))[kept].sum()),
                        first_dropped=[table[int(i)]["loc"] for i in dropped[:3]])
        if not s.kept:
            raise UserError(f"{source.display}: no pair is left to train on ({s.identical} with chosen = rejected, "
                            f"{s.prompt_too_long} whose prompt fills max_length={max_length})")
        return s.__dict__

    table, manifest = source.mapped(
        _tokenize_pairs, key={"stage": "preference pairs", "format": fmt, "template": tmpl.spec(),
                              "implicit_cut": "word", "max_length": max_length},
        features=_pair_features(), tokenizer=tokenizer,
        fn_kwargs={"tokenizer": tokenizer, "template": tmpl, "max_length": max_length},
        normalise=(to_row, _pair_schema()), num_proc=num_proc, cache_dir=cache_dir,
        desc=f"tokenizing pairs of {source.display}", finish=keep_rows("keep", KEPT, describe))
    summary = PairSummary(**{**manifest["summary"], "fingerprint": manifest["entry"].rsplit("/", 1)[-1]})
    return kept_table(table, manifest).select_columns(PAIR_COLUMNS), summary


def prepare_pairs(sources: list, tokenizer, template, max_length: int, *, dataset_format: str = "auto",
                  mixture: str = "concat", seed: int = 0, num_proc: int | None = None, cache_dir=None):
    """The kept pairs of ``sources`` (opened by :func:`tunesmith.data.source.open_sources`), mixed as the data entry
    mixes token rows, as one memory-mapped ``datasets.Dataset`` with columns ``prompt_ids``, ``chosen_ids``,
    ``rejected_ids`` (untruncated; the collator cuts rows at ``max_length``), and the per-source summaries."""
    parts = [source_pairs(s, tokenizer, template, max_length, dataset_format=dataset_format, num_proc=num_proc,
                          cache_dir=cache_dir) for s in sources]
    table = mix_tables([t for t, _ in parts], sources, mixture, seed, PAIR_COLUMNS, cache_dir)
    return table, [summary for _, summary in parts]
