"""Win rates from pairwise judgements, as the NEFTune paper reports them.

* AlpacaEval win rate of A over B: ``100 * (wins + 0.5 * draws) / n`` with a percentile-bootstrap confidence interval
  (prompts resampled with replacement).
* The paper's human-study figure: ``100 * wins / (n - draws)`` (draws left out), with its own bootstrap interval.

``n`` counts the judged prompts only; prompts the judge could not judge ("unjudged") are reported separately and never
folded into draws.
"""
from __future__ import annotations

import numpy as np

OUTCOMES = ("A", "B", "tie", "unjudged")
LABEL_ALPACA = "win rate 100·(wins + ½·draws)/n (AlpacaEval)"
LABEL_HUMAN = "win rate 100·wins/(n − draws) (NEFTune human study)"


def _rates(wins: np.ndarray, draws: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    alpaca = 100.0 * (wins + 0.5 * draws) / n
    decided = n - draws
    with np.errstate(divide="ignore", invalid="ignore"):
        human = np.where(decided > 0, 100.0 * wins / np.maximum(decided, 1), np.nan)
    return alpaca, human


def win_rate(outcomes: list[str], n_bootstrap: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Summarise per-prompt outcomes ("A" = A wins, "B", "tie", "unjudged") from A's point of view."""
    bad = sorted({o for o in outcomes if o not in OUTCOMES})
    if bad:
        raise ValueError(f"unknown outcome(s) {bad}; expected one of {OUTCOMES}")
    judged = np.array([o for o in outcomes if o != "unjudged"])
    n = len(judged)
    out = {"n": n, "wins": int((judged == "A").sum()), "losses": int((judged == "B").sum()),
           "draws": int((judged == "tie").sum()), "unjudged": len(outcomes) - n,
           "confidence": confidence, "n_bootstrap": n_bootstrap,
           "label_win_rate": LABEL_ALPACA, "label_win_rate_excluding_draws": LABEL_HUMAN}
    if n == 0:
        out.update(win_rate=None, ci_low=None, ci_high=None, win_rate_excluding_draws=None,
                   ci_excluding_draws_low=None, ci_excluding_draws_high=None)
        return out
    alpaca, human = _rates(np.array(out["wins"]), np.array(out["draws"]), n)
    out["win_rate"] = float(alpaca)
    out["win_rate_excluding_draws"] = None if np.isnan(human) else float(human)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_bootstrap, n))
    sample = judged[idx]
    b_alpaca, b_human = _rates((sample == "A").sum(1), (sample == "tie").sum(1), n)
    lo, hi = 100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2
    out["ci_low"], out["ci_high"] = (float(v) for v in np.percentile(b_alpaca, [lo, hi]))
    b_human = b_human[~np.isnan(b_human)]
    if out["win_rate_excluding_draws"] is None or not len(b_human):
        out["ci_excluding_draws_low"] = out["ci_excluding_draws_high"] = None
    else:
        out["ci_excluding_draws_low"], out["ci_excluding_draws_high"] = (
            float(v) for v in np.percentile(b_human, [lo, hi]))
    return out


def win_rate_clustered(outcomes: list[str], clusters: list, n_bootstrap: int = 2000, confidence: float = 0.95,
                       seed: int = 0) -> dict:
    """:func:`win_rate` of outcomes that come in clusters — the same prompt judged for several seeds — with the
    bootstrap resampling whole clusters (a prompt with all its seeds), not single outcomes: outcomes of one prompt are
    correlated, and resampling them as independent gives too narrow an interval. ``clusters[i]`` names the cluster of
    ``outcomes[i]``. The point estimates are :func:`win_rate`'s; the intervals are percentile intervals over cluster
    resamples (each resample's rate over the outcomes it holds)."""
    if len(clusters) != len(outcomes):
        raise ValueError(f"{len(outcomes)} outcomes but {len(clusters)} cluster labels")
    out = win_rate(outcomes, n_bootstrap, confidence, seed)
    keep = [(c, o) for c, o in zip(clusters, outcomes) if o != "unjudged"]
    names = sorted({c for c, _ in keep}, key=str)
    out["clusters"] = len(names)
    if not keep:
        return out
    index = {c: i for i, c in enumerate(names)}
    counts = np.zeros((len(names), 3))  # per cluster: wins, draws, judged
    for c, o in keep:
        counts[index[c]] += (o == "A", o == "tie", 1)
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, len(names), size=(n_bootstrap, len(names)))
    totals = counts[draw].sum(axis=1)  # (n_bootstrap, 3)
    wins, draws, n = totals[:, 0], totals[:, 1], totals[:, 2]
    alpaca = 100.0 * (wins + 0.5 * draws) / n
    decided = n - draws
    with np.errstate(divide="ignore", invalid="ignore"):
        human = np.where(decided > 0, 100.0 * wins / np.maximum(decided, 1), np.nan)
    lo, hi = 100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2
    out["ci_low"], out["ci_high"] = (float(v) for v in np.percentile(alpaca, [lo, hi]))
    human = human[~np.isnan(human)]
    if out["win_rate_excluding_draws"] is not None and len(human):
        out["ci_excluding_draws_low"], out["ci_excluding_draws_high"] = (
            float(v) for v in np.percentile(human, [lo, hi]))
    return out


def combine_orders(first: str | None, second: str | None) -> str:
    """Outcome of one prompt judged in both orders.

    ``first`` is the verdict with A shown as answer 1, ``second`` with B shown as answer 1 (verdicts "1", "2", "tie",
    or None when that call failed). A side wins only if the judge prefers it in both orders; any disagreement is a
    draw (MT-Bench's rule for position bias). A failed call makes the prompt "unjudged"."""
    if first is None or second is None:
        return "unjudged"
    a1 = {"1": "A", "2": "B", "tie": "tie"}[first]
    a2 = {"1": "B", "2": "A", "tie": "tie"}[second]
    return a1 if a1 == a2 else "tie"


def format_summary(s: dict, name_a: str = "A", name_b: str = "B") -> str:
    """Two labelled lines a person can read."""
    if s["win_rate"] is None:
        return f"{name_a} vs {name_b}: no judged prompts ({s['unjudged']} unjudged)"
    pct = int(round(100 * s["confidence"]))
    lines = [f"{name_a} vs {name_b}: {s['wins']} wins, {s['draws']} draws, {s['losses']} losses over n={s['n']} "
             f"judged prompts ({s['unjudged']} unjudged)",
             f"  {LABEL_ALPACA}: {s['win_rate']:.2f}  [{pct}% CI {s['ci_low']:.2f}, {s['ci_high']:.2f}]"]
    if s["win_rate_excluding_draws"] is None:
        lines.append(f"  {LABEL_HUMAN}: undefined (all draws)")
    else:
        lines.append(f"  {LABEL_HUMAN}: {s['win_rate_excluding_draws']:.2f}  "
                     f"[{pct}% CI {s['ci_excluding_draws_low']:.2f}, {s['ci_excluding_draws_high']:.2f}]")
    return "\n".join(lines)
