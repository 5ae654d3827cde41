"""Issue 18.8 (statistics): scripts/spin_sweep.py's pooled win rate resamples prompts with their seeds together."""
import importlib.util
import json
import random
from pathlib import Path

import pytest

from tunesmith.evaluation.winrate import win_rate, win_rate_clustered

ROOT = Path(__file__).resolve().parent.parent


def sweep_module():
    spec = importlib.util.spec_from_file_location("spin_sweep", ROOT / "scripts" / "spin_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def correlated_outcomes(prompts=160, seeds=3, seed=0):
    """Each prompt's outcome is the same in every seed (fully correlated): 160 x 3 outcomes carry the information of
    160."""
    rng = random.Random(seed)
    per_prompt = [rng.choice(["A", "A", "B", "tie", "tie", "tie"]) for _ in range(prompts)]
    return per_prompt, [[o for o in per_prompt] for _ in range(seeds)]


def test_clustered_interval_of_perfectly_correlated_seeds_is_the_single_seed_interval():
    per_prompt, by_seed = correlated_outcomes()
    outcomes = [o for run in by_seed for o in run]
    clusters = [i for _ in by_seed for i in range(len(per_prompt))]
    single = win_rate(per_prompt, n_bootstrap=4000)
    pooled = win_rate_clustered(outcomes, clusters, n_bootstrap=4000)
    naive = win_rate(outcomes, n_bootstrap=4000)
    assert pooled["win_rate"] == pytest.approx(single["win_rate"]) and pooled["clusters"] == 160
    width = lambda s: s["ci_high"] - s["ci_low"]  # noqa: E731
    assert width(pooled) == pytest.approx(width(single), rel=0.12)
    assert width(pooled) / width(naive) == pytest.approx(3 ** 0.5, rel=0.15)  # the naive one: sqrt(3) too narrow


def test_pooled_win_of_the_sweep_resamples_prompts_with_their_seeds(tmp_path):
    per_prompt, by_seed = correlated_outcomes(prompts=40)
    dirs = []
    for s, run in enumerate(by_seed):
        d = tmp_path / f"seed{s}"
        d.mkdir()
        (d / "judgements.jsonl").write_text("".join(json.dumps({"instruction": f"q{i}", "outcome": o}) + "\n"
                                                    for i, o in enumerate(run)))
        dirs.append(d)
    pooled = sweep_module().pooled_win(dirs)
    assert pooled["clusters"] == 40 and pooled["n"] == 120
    outcomes = [o for run in by_seed for o in run]
    expected = win_rate_clustered(outcomes, [i for _ in by_seed for i in range(40)])
    assert (pooled["ci_low"], pooled["ci_high"]) == (expected["ci_low"], expected["ci_high"])
