"""Text metrics of the NEFTune paper's analyses: overlap with references, length, repetition and diversity.

Definitions (../shared/design/PAPERS.md):

* ROUGE-L: F-measure of the longest common subsequence, computed by rouge-score
  (``RougeScorer(["rougeL"])``: lowercase, runs of ``[a-z0-9]``, no stemming).
* BLEU: up to 4-grams, computed by sacrebleu (``13a`` tokens, default ``exp`` smoothing): the corpus score is
  ``sacrebleu.corpus_bleu``, the per-answer score ``sacrebleu.sentence_bleu`` (effective order). Scale 0-100.
* Lengths: characters and whitespace tokens of each answer.
* rep-n and diversity, in one of two modes (``mode``), both on the first ``n_tokens`` whitespace tokens of each
  answer (answers shorter than that are left out of these numbers and counted in ``n_too_short``):

  - ``formula`` (default), the definition as written: rep-n = 100 * (1 - |unique n-grams| / |n-grams|) over all
    n-grams of each answer (n = 2, 3, 4);
  - ``paper``, what produced the NEFTune paper's Table 4 (SimCTG's measurement code, Su et al. 2022): the n-gram
    loop stops one n-gram early (each answer's last n-gram is not counted) and rep-n is rounded to 2 decimals
    before diversity is computed from it.

  In both, set-level rep-n pools the n-gram counts of all kept answers (as the SimCTG / NEFTune reference code does),
  diversity = prod_n (1 - rep-n / 100) and log-diversity = -log(1 - diversity), CAPPED AT 20 (a text without any
  repeated 2-gram has diversity 1 and an infinite log-diversity; the reference code caps it at 20, so do we).
"""
from __future__ import annotations

import functools
import math
import statistics

LOG_DIVERSITY_CAP = 20.0
DIVERSITY_MODES = ("formula", "paper")
AUTO_KEEP = 0.8  # n_tokens "auto": the largest N that keeps at least this share of the answers


def auto_n_tokens(texts: list[str], least: int = 4, keep: float = AUTO_KEEP) -> int:
    """The largest N such that at least ``keep`` of ``texts`` have N or more whitespace tokens (never below
    ``least``, the shortest N the measure is defined for: then fewer answers are kept, and ``n_used`` says so)."""
    counts = sorted((len(t.split()) for t in texts), reverse=True)
    if not counts:
        return least
    need = max(1, math.ceil(round(keep * len(counts), 9)))  # answers that must be kept
    return max(least, counts[need - 1])


# ---------------------------------------------------------------- ROUGE-L and BLEU (rouge-score, sacrebleu)

@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])


@functools.cache
def _bleu(effective_order: bool):
    from sacrebleu.metrics import BLEU

    return BLEU(effective_order=effective_order)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure in [0, 1] of one prediction against one reference."""
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


def sentence_bleu(prediction: str, reference: str) -> float:
    """BLEU (0-100) of one answer, with effective order (short answers are not zeroed by missing 4-grams)."""
    return _bleu(True).sentence_score(prediction, [reference]).score


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU (0-100): n-gram statistics summed over all pairs, then one score."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    return _bleu(False).corpus_score(list(predictions), [list(references)]).score


def overlap(predictions: list[str], references: list[str]) -> dict:
    """ROUGE-L and BLEU of generations against references (e.g. the training answers: NEFTune Fig. 5)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not references:
        raise ValueError("empty reference set")
    rl = [rouge_l(p, r) for p, r in zip(predictions, references)]
    bl = [sentence_bleu(p, r) for p, r in zip(predictions, references)]
    return {
        "n": len(references),
        "rouge_l_mean": statistics.fmean(rl),
        "bleu_sentence_mean": statistics.fmean(bl),
        "bleu_corpus": corpus_bleu(predictions, references),
        "rouge_l": rl,
        "bleu": bl,
    }


# ---------------------------------------------------------------- length, repetition, diversity

def lengths(texts: list[str]) -> dict:
    chars = [len(t) for t in texts]
    words = [len(t.split()) for t in texts]
    if not texts:
        return {"n": 0}
    return {"n": len(texts), "chars_mean": statistics.fmean(chars), "chars_median": statistics.median(chars),
            "words_mean": statistics.fmean(words), "words_median": statistics.median(words)}


def _ngram_counts(tokens: list[str], n: int, skip_last: bool = False) -> tuple[int, int]:
    """(unique, total) n-grams of ``tokens``; ``skip_last`` leaves the last n-gram out (SimCTG's loop)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + int(not skip_last))]
    return len(set(grams)), len(grams)


def log_diversity_from(diversity: float) -> float:
    """-log(1 - diversity), capped at :data:`LOG_DIVERSITY_CAP` (20) when diversity is (numerically) 1."""
    if diversity >= 1.0:
        return LOG_DIVERSITY_CAP
    return min(-math.log(1.0 - diversity), LOG_DIVERSITY_CAP)


def rep_diversity(texts: list[str], n_tokens: int | str = 50, orders: tuple[int, ...] = (2, 3, 4),
                  mode: str = "formula") -> dict:
    """rep-n, diversity and log-diversity on the first ``n_tokens`` whitespace tokens of each answer.

    ``mode``: ``formula`` (the definition as written) or ``paper`` (SimCTG's code behind the NEFTune paper's numbers:
    each answer's last n-gram is skipped and rep-n is rounded to 2 decimals). Answers with fewer than ``n_tokens``
    tokens are left out; ``n_used`` and ``n_too_short`` say how many. ``n_tokens="auto"``: :func:`auto_n_tokens`
    (the result's ``n_tokens`` is the N used, ``n_tokens_rule`` says how it was chosen)."""
    if mode not in DIVERSITY_MODES:
        raise ValueError(f"diversity mode must be one of {', '.join(DIVERSITY_MODES)}, got {mode!r}")
    paper = mode == "paper"
    least = max(orders) + int(paper)  # paper mode needs one token more for a single n-gram of the top order
    rule = "fixed"
    if n_tokens == "auto":
        n_tokens, rule = auto_n_tokens(texts, least), f"auto (the largest N keeping >= {AUTO_KEEP:.0%} of answers)"
    if not isinstance(n_tokens, int) or n_tokens < least:
        raise ValueError(f"n_tokens must be at least {least} in {mode} mode, got {n_tokens}")
    kept = [t.split()[:n_tokens] for t in texts if len(t.split()) >= n_tokens]
    out = {"mode": mode, "n_tokens": n_tokens, "n_tokens_rule": rule, "n_used": len(kept),
           "n_too_short": len(texts) - len(kept),
           "log_diversity_cap": LOG_DIVERSITY_CAP}
    if not kept:
        out.update({f"rep_{n}": None for n in orders} | {"diversity": None, "log_diversity": None})
        return out
    diversity = 1.0
    for n in orders:
        unique = total = 0
        for toks in kept:
            u, t = _ngram_counts(toks, n, skip_last=paper)
            unique += u
            total += t
        rep = 100.0 * (1.0 - unique / total)
        if paper:
            rep = round(rep, 2)
        out[f"rep_{n}"] = rep
        diversity *= 1.0 - rep / 100.0
    out["diversity"] = diversity
    out["log_diversity"] = log_diversity_from(diversity)
    return out
