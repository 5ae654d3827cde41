"""Template segments -> token ids and labels (-100 everywhere but the responses).

Each segment is tokenized on its own and the ids are concatenated, so the prompt a model is given at generation time
(:func:`encode_prompt`) is token-for-token the prefix it was trained on.
"""
from __future__ import annotations

import weakref

from tunesmith.data.formats import Example
from tunesmith.data.templates import Template

IGNORE = -100


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


_ADDS_BOS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def adds_bos(tokenizer) -> bool:
    """True when the tokenizer's own encoding starts with BOS (Llama-style); then tunesmith adds it too.
    Cached per tokenizer object (the answer cannot change for a given tokenizer)."""
    if tokenizer not in _ADDS_BOS:
        bos = tokenizer.bos_token_id
        ids = tokenizer("a")["input_ids"] if bos is not None else []
        _ADDS_BOS[tokenizer] = bool(ids) and ids[0] == bos
    return _ADDS_BOS[tokenizer]


def _tokens(tokenizer, template: Template, example: Example, train_on_prompt: bool) -> tuple[list, list]:
    ids: list[int] = []
    labels: list[int] = []
    if adds_bos(tokenizer):
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE)
    eos = tokenizer.eos_token_id
    if example.text is not None:  # plain text: everything is trained
        t = _ids(tokenizer, example.text) + ([eos] if eos is not None else [])
        return ids + t, labels + t
    for text, trained in template.segments(example):
        t = _ids(tokenizer, text)
        if trained and template.appends_eos and eos is not None:
            t = t + [eos]
        ids += t
        labels += t if (trained or train_on_prompt) else [IGNORE] * len(t)
    return ids, labels


def encode_prompt(tokenizer, template: Template, example: Example) -> list[int]:
    """Token ids of the generation prompt: the conversation up to where the last response starts."""
    ex = example if example.turns[-1].response is None else example.for_generation()
    return _tokens(tokenizer, template, ex, train_on_prompt=False)[0]


def encode(tokenizer, template: Template, example: Example, max_length: int,
           train_on_prompt: bool = False, return_full_length: bool = False) -> dict | None:
    """input_ids + labels for one example, truncated to ``max_length`` from the end (the prompt's start is kept).

    Returns None when no trained token is left (empty response, or the response truncated away).
    ``return_full_length`` adds ``full_length``, the untruncated token count.
    """
    ids, labels = _tokens(tokenizer, template, example, train_on_prompt)
    full_length = len(ids)
    ids, labels = ids[:max_length], labels[:max_length]
    if all(x == IGNORE for x in labels):
        return None
    out = {"input_ids": ids, "labels": labels}
    if return_full_length:
        out["full_length"] = full_length
    return out
