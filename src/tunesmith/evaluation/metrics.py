"""Text metrics of the NEFTune paper's analyses: overlap with references, length, repetition and diversity.

Definitions (../shared/design/PAPERS.md):

* ROUGE-L: F-measure of the longest common subsequence, on rouge-score's tokens (lowercase, runs of ``[a-z0-9]``;
  no stemming). Agrees with ``rouge_score.rouge_scorer.RougeScorer(["rougeL"])``.
* BLEU: up to 4-grams on sacrebleu's ``13a`` tokens with its default ``exp`` smoothing. The corpus score agrees with
  ``sacrebleu.corpus_bleu``, the per-answer score (effective order) with ``sacrebleu.sentence_bleu``. Scale 0-100.
* Lengths: characters and whitespace tokens of each answer.
* rep-n = 100 * (1 - |unique n-grams| / |n-grams|) over whitespace tokens (n = 2, 3, 4);
  diversity = prod_n (1 - rep-n / 100); log-diversity = -log(1 - diversity), CAPPED AT 20 (a text without any
  repeated 2-gram has diversity 1 and an infinite log-diversity; the reference code caps it at 20, so do we).
  All three use only the first ``n_tokens`` whitespace tokens of each answer; answers shorter than that are left out
  of these numbers and their count is reported (``n_too_short``). Set-level rep-n pools the n-gram counts of all kept
  answers (as the SimCTG / NEFTune reference code does; with every answer truncated to the same N this equals the mean
  of the per-answer values), and set-level diversity is computed from the pooled rep-n.
"""
from __future__ import annotations

import math
import re
import statistics
from collections import Counter

LOG_DIVERSITY_CAP = 20.0
_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")


# ---------------------------------------------------------------- ROUGE-L

def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenization (without stemming)."""
    return _ROUGE_TOKEN.findall(text.lower())


def lcs_length(a: list, b: list) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure in [0, 1] of one prediction against one reference."""
    p, r = rouge_tokens(prediction), rouge_tokens(reference)
    if not p or not r:
        return 0.0
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------- BLEU

def _bleu_tokens(text: str) -> list[str]:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()(text.rstrip()).split()


def _ngram_stats(hyp: list[str], ref: list[str], max_n: int = 4) -> tuple[list[int], list[int]]:
    correct, total = [], []
    for n in range(1, max_n + 1):
        h = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
        r = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
        correct.append(sum(min(c, r[g]) for g, c in h.items()))
        total.append(max(len(hyp) - n + 1, 0))
    return correct, total


def _bleu_from_stats(correct, total, hyp_len, ref_len, effective_order: bool) -> float:
    """BLEU (0-100) from sufficient statistics: geometric mean of n-gram precisions (``exp`` smoothing: the k-th
    zero-match order gets precision 1 / (2^k * total)) times the brevity penalty."""
    if not any(correct):
        return 0.0
    bp = 1.0 if hyp_len >= ref_len else (math.exp(1 - ref_len / hyp_len) if hyp_len > 0 else 0.0)
    logs, smooth = [], 1.0
    for c, t in zip(correct, total):
        if t == 0:
            if effective_order:
                break
            logs.append(-9999999999.0)  # log(0): a corpus with no n-grams of this order scores 0
            continue
        if c == 0:
            smooth *= 2
            logs.append(math.log(100.0 / (smooth * t)))
        else:
            logs.append(math.log(100.0 * c / t))
    return bp * math.exp(sum(logs) / len(logs))


def sentence_bleu(prediction: str, reference: str) -> float:
    """BLEU (0-100) of one answer, with effective order (short answers are not zeroed by missing 4-grams)."""
    hyp, ref = _bleu_tokens(prediction), _bleu_tokens(reference)
    correct, total = _ngram_stats(hyp, ref)
    return _bleu_from_stats(correct, total, len(hyp), len(ref), effective_order=True)


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU (0-100): n-gram statistics summed over all pairs, then one score."""
    correct, total, hyp_len, ref_len = [0] * 4, [0] * 4, 0, 0
    for p, r in zip(predictions, references, strict=True):
        hyp, ref = _bleu_tokens(p), _bleu_tokens(r)
        c, t = _ngram_stats(hyp, ref)
        correct = [a + b for a, b in zip(correct, c)]
        total = [a + b for a, b in zip(total, t)]
        hyp_len += len(hyp)
        ref_len += len(ref)
    return _bleu_from_stats(correct, total, hyp_len, ref_len, effective_order=False)


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


def _ngram_counts(tokens: list[str], n: int) -> tuple[int, int]:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)), len(grams)


def log_diversity_from(diversity: float) -> float:
    """-log(1 - diversity), capped at :data:`LOG_DIVERSITY_CAP` (20) when diversity is (numerically) 1."""
    if diversity >= 1.0:
        return LOG_DIVERSITY_CAP
    return min(-math.log(1.0 - diversity), LOG_DIVERSITY_CAP)


def rep_diversity(texts: list[str], n_tokens: int = 50, orders: tuple[int, ...] = (2, 3, 4)) -> dict:
    """rep-n, diversity and log-diversity on the first ``n_tokens`` whitespace tokens of each answer.

    Answers with fewer than ``n_tokens`` tokens are left out; ``n_used`` and ``n_too_short`` say how many."""
    if n_tokens < max(orders):
        raise ValueError(f"n_tokens must be at least {max(orders)}, got {n_tokens}")
    kept = [t.split()[:n_tokens] for t in texts if len(t.split()) >= n_tokens]
    out = {"n_tokens": n_tokens, "n_used": len(kept), "n_too_short": len(texts) - len(kept),
           "log_diversity_cap": LOG_DIVERSITY_CAP}
    if not kept:
        out.update({f"rep_{n}": None for n in orders} | {"diversity": None, "log_diversity": None})
        return out
    diversity = 1.0
    for n in orders:
        unique = total = 0
        for toks in kept:
            u, t = _ngram_counts(toks, n)
            unique += u
            total += t
        rep = 100.0 * (1.0 - unique / total)
        out[f"rep_{n}"] = rep
        diversity *= 1.0 - rep / 100.0
    out["diversity"] = diversity
    out["log_diversity"] = log_diversity_from(diversity)
    return out


def text_stats(texts: list[str], n_tokens: int = 50) -> dict:
    """The NEFTune Table 4 row for one set of answers: lengths plus repetition / diversity."""
    return {"length": lengths(texts), "diversity": rep_diversity(texts, n_tokens)}
