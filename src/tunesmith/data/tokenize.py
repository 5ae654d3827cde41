"""Template segments -> token ids and labels (-100 everywhere but the responses).

Each segment is tokenized on its own and the ids are concatenated, so the prompt a model is given at generation time
(:func:`encode_prompt`) is token-for-token the prefix it was trained on. :func:`encode_batch` does this for many
examples with one tokenizer call (the fast tokenizers encode a list of texts much faster than one text at a time);
the single-example functions are that with a batch of one, so both give the same ids.
"""
from __future__ import annotations

import weakref

from tunesmith.data.formats import Example
from tunesmith.data.templates import Template

IGNORE = -100


_ADDS_BOS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def adds_bos(tokenizer) -> bool:
    """True when the tokenizer's own encoding starts with BOS (Llama-style); then tunesmith adds it too.
    Cached per tokenizer object (the answer cannot change for a given tokenizer)."""
    if tokenizer not in _ADDS_BOS:
        bos = tokenizer.bos_token_id
        ids = tokenizer("a")["input_ids"] if bos is not None else []
        _ADDS_BOS[tokenizer] = bool(ids) and ids[0] == bos
    return _ADDS_BOS[tokenizer]


def _tokens_batch(tokenizer, template: Template, examples: list[Example],
                  train_on_prompt: bool) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of every example, untruncated."""
    eos = tokenizer.eos_token_id
    plans = []  # per example: [(text, trained, eos appended)]
    for ex in examples:
        if ex.text is not None:  # plain text: everything is trained
            plans.append([(ex.text, True, True)])
        else:
            plans.append([(text, trained, trained and template.appends_eos)
                          for text, trained in template.segments(ex)])
    texts = [text for plan in plans for text, _, _ in plan if text]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    out = []
    for ex, plan in zip(examples, plans):
        start = bos if ex.text is not None or not template.writes_bos else []
        ids, labels = list(start), [IGNORE] * len(start)
        for text, trained, add_eos in plan:
            t = next(encoded) if text else []
            if add_eos and eos is not None:
                t = t + [eos]
            ids += t
            labels += t if (trained or train_on_prompt) else [IGNORE] * len(t)
        out.append((ids, labels))
    return out


def encode_prompt(tokenizer, template: Template, example: Example) -> list[int]:
    """Token ids of the generation prompt: the conversation up to where the last response starts."""
    ex = example if example.turns[-1].response is None else example.for_generation()
    return _tokens_batch(tokenizer, template, [ex], train_on_prompt=False)[0][0]


def encode_batch(tokenizer, template: Template, examples: list[Example], max_length: int,
                 train_on_prompt: bool = False) -> list[dict | None]:
    """:func:`encode` of every example (with ``full_length``), tokenized in one call."""
    out = []
    for ids, labels in _tokens_batch(tokenizer, template, examples, train_on_prompt):
        full_length = len(ids)
        ids, labels = ids[:max_length], labels[:max_length]
        if labels.count(IGNORE) == len(labels):  # nothing left to train
            out.append(None)
        else:
            out.append({"input_ids": ids, "labels": labels, "full_length": full_length})
    return out


def encode(tokenizer, template: Template, example: Example, max_length: int,
           train_on_prompt: bool = False, return_full_length: bool = False) -> dict | None:
    """input_ids + labels for one example, truncated to ``max_length`` from the end (the prompt's start is kept).

    Returns None when no trained token is left (empty response, or the response truncated away).
    ``return_full_length`` adds ``full_length``, the untruncated token count.
    """
    [out] = encode_batch(tokenizer, template, [example], max_length, train_on_prompt)
    if out is not None and not return_full_length:
        del out["full_length"]
    return out
