import math
import random

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from tunesmith.evaluation import metrics as M

PAIRS = [
    ("The cat sat on the mat.", "A cat was sitting on the mat!"),
    ("Paris is the capital of France, of course.", "The capital of France is Paris."),
    ("completely unrelated words here", "nothing in common at all"),
    ("", "empty prediction"),
    ("one", "one"),
    ("Step 1: boil water. Step 2: add pasta; cook 8-10 minutes.", "Boil the water, then add the pasta and cook it."),
    ("It's 3.14, isn't it? Yes -- it's pi.", "Pi is 3.14159, isn't it?"),
    ("a b a b a b a b", "a b c d a b"),
]


def _random_pairs(n=40, seed=0):
    rng = random.Random(seed)
    vocab = "the a cat dog sat ran on under mat rug , . ! big small 42 it's don't".split()
    return [(" ".join(rng.choices(vocab, k=rng.randint(1, 30))), " ".join(rng.choices(vocab, k=rng.randint(1, 30))))
            for _ in range(n)]


@pytest.mark.parametrize("pred,ref", PAIRS + _random_pairs())
def test_rouge_l_matches_rouge_score(pred, ref):
    expected = rouge_scorer.RougeScorer(["rougeL"]).score(ref, pred)["rougeL"].fmeasure
    assert M.rouge_l(pred, ref) == pytest.approx(expected, abs=1e-12)


def test_rouge_l_hand_computed():
    # tokens: [the cat sat on the mat] vs [a cat was sitting on the mat]; LCS = cat on the mat = 4
    p, r = 4 / 6, 4 / 7
    assert M.rouge_l("The cat sat on the mat.", "A cat was sitting on the mat!") == pytest.approx(2 * p * r / (p + r))
    assert M.rouge_l("", "empty prediction") == 0.0
    # argument order: prediction first. 2 of 2 prediction tokens, 2 of 4 reference tokens -> P 1, R 0.5
    assert M.rouge_l("a b", "a b c d") == pytest.approx(2 * 1 * 0.5 / 1.5)


@pytest.mark.parametrize("pred,ref", PAIRS + _random_pairs(seed=1))
def test_sentence_bleu_matches_sacrebleu(pred, ref):
    assert M.sentence_bleu(pred, ref) == pytest.approx(sacrebleu.sentence_bleu(pred, [ref]).score, abs=1e-9)


def test_corpus_bleu_matches_sacrebleu():
    for pairs in (PAIRS, _random_pairs(seed=2), [("a b", "a b c")]):
        preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
        assert M.corpus_bleu(preds, refs) == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score, abs=1e-9)


def test_bleu_hand_computed():
    # identical 5-token sentence -> all precisions 1, no brevity penalty -> 100
    assert M.sentence_bleu("w x y z q", "w x y z q") == pytest.approx(100.0)
    # hyp "a b c d" vs ref "a b c d e": precisions 1 but BP = exp(1 - 5/4)
    assert M.corpus_bleu(["a b c d"], ["a b c d e"]) == pytest.approx(100 * math.exp(1 - 5 / 4))


def test_overlap_summary_and_errors():
    out = M.overlap(["a b c", "x"], ["a b c", "y"])
    assert out["n"] == 2 and out["rouge_l"] == [1.0, 0.0] and out["rouge_l_mean"] == 0.5
    with pytest.raises(ValueError, match="empty reference"):
        M.overlap([], [])
    with pytest.raises(ValueError, match="2 predictions but 1"):
        M.overlap(["a", "b"], ["a"])


def test_lengths():
    out = M.lengths(["ab cd", "x", "one two three"])
    assert out["chars_mean"] == pytest.approx((5 + 1 + 13) / 3)
    assert out["words_mean"] == pytest.approx(2) and out["words_median"] == 2


def test_rep_n_and_diversity_hand_computed():
    # first 6 tokens of "a b a b a b c": a b a b a b -> 2-grams: ab ba ab ba ab (5, 2 unique) rep2 = 60
    # 3-grams: aba bab aba bab (4, 2 unique) rep3 = 50; 4-grams: abab baba abab (3, 2 unique) rep4 = 100/3
    out = M.rep_diversity(["a b a b a b c", "too short"], n_tokens=6)
    assert out["n_used"] == 1 and out["n_too_short"] == 1
    assert out["rep_2"] == pytest.approx(60.0)
    assert out["rep_3"] == pytest.approx(50.0)
    assert out["rep_4"] == pytest.approx(100 / 3)
    div = 0.4 * 0.5 * (2 / 3)
    assert out["diversity"] == pytest.approx(div)
    assert out["log_diversity"] == pytest.approx(-math.log(1 - div))


def test_rep_pools_counts_over_answers():
    # answer 1 (4 tokens "a a a a"): 2-grams 3, unique 1; answer 2 "a b c d": 3, unique 3 -> rep2 = 100*(1 - 4/6)
    out = M.rep_diversity(["a a a a x", "a b c d"], n_tokens=4)
    assert out["n_used"] == 2 and out["rep_2"] == pytest.approx(100 * (1 - 4 / 6))


def test_log_diversity_capped_at_20():
    out = M.rep_diversity(["one two three four five six"], n_tokens=5)
    assert out["rep_2"] == 0 and out["diversity"] == 1.0
    assert out["log_diversity"] == M.LOG_DIVERSITY_CAP == 20.0


def test_all_too_short_and_bad_n():
    out = M.rep_diversity(["a b", "c"], n_tokens=10)
    assert out["n_used"] == 0 and out["n_too_short"] == 2 and out["rep_2"] is None
    with pytest.raises(ValueError):
        M.rep_diversity(["a b c"], n_tokens=3)


def simctg_reference(texts, n_tokens):
    """An independent transcription of SimCTG's measure_repetition_and_diversity (the code behind NEFTune's Table 4),
    applied to the first n_tokens words of each answer long enough, as NEFTune's evaluation does."""
    kept = [" ".join(t.split()[:n_tokens]) for t in texts if len(t.split()) >= n_tokens]
    reps = {}
    for n in (2, 3, 4):
        unique = total = 0
        for text in kept:
            words = text.strip().split()
            start, end, seen, count = 0, n, set(), 0
            while end < len(words):  # stops before the last n-gram
                seen.add(" ".join(words[start:end]))
                count += 1
                start, end = start + 1, end + 1
            unique, total = unique + len(seen), total + count
        reps[n] = round((1 - unique / total) * 100, 2)
    div = (1 - reps[2] / 100) * (1 - reps[3] / 100) * (1 - reps[4] / 100)
    return reps, div


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paper_mode_matches_simctg_reference(seed):
    rng = random.Random(seed)
    texts = [" ".join(rng.choices("a b c d e f".split(), k=rng.randint(3, 20))) for _ in range(30)]
    out = M.rep_diversity(texts, n_tokens=9, mode="paper")
    reps, div = simctg_reference(texts, 9)
    assert out["mode"] == "paper" and out["n_used"] == sum(len(t.split()) >= 9 for t in texts) > 0
    assert [out["rep_2"], out["rep_3"], out["rep_4"]] == [reps[2], reps[3], reps[4]]
    assert out["diversity"] == pytest.approx(div, abs=1e-12)
    assert out["log_diversity"] == pytest.approx(-math.log(1 - div))
    formula = M.rep_diversity(texts, n_tokens=9)
    assert formula["mode"] == "formula" and formula["rep_2"] != out["rep_2"]  # the two modes really differ here


def test_paper_mode_hand_computed():
    # "a b a b a b" without its last 2-gram: ab ba ab ba (4, 2 unique) -> 50.0 (formula: 60.0)
    # 3-grams without the last: aba bab aba (3, 2 unique) -> 33.33 (rounded; formula 50.0)
    # 4-grams without the last: abab baba (2, 2 unique) -> 0.0
    out = M.rep_diversity(["a b a b a b"], n_tokens=6, mode="paper")
    assert (out["rep_2"], out["rep_3"], out["rep_4"]) == (50.0, 33.33, 0.0)
    assert out["diversity"] == pytest.approx(0.5 * (1 - 0.3333))
    with pytest.raises(ValueError, match="at least 5 in paper mode"):
        M.rep_diversity(["a b c d"], n_tokens=4, mode="paper")
    with pytest.raises(ValueError, match="mode"):
        M.rep_diversity(["a b c d"], n_tokens=4, mode="simctg")
