"""SPIN's per-iteration summary: ``summary.json`` and the Markdown table ``summary.md``, from the stages the run
directory records."""
from __future__ import annotations

from pathlib import Path

from tunesmith.io import atomic_write_json, atomic_write_text


def summary_rows(stage, num_iterations: int) -> list[dict]:
    """One row per iteration from ``stage(name)``, the metrics recorded for a finished stage (or None)."""
    rows = []
    for t in range(num_iterations):
        g, r, tr = (stage(f"iteration-{t}/{name}") or {} for name in ("generate", "reference", "train"))
        rows.append({"iteration": t, "loss": tr.get("loss"), "policy_real": tr.get("policy_real"),
                     "policy_generated": tr.get("policy_generated"), "ref_real": r.get("ref_real"),
                     "ref_generated": r.get("ref_generated"), "reward_margin": tr.get("reward_margin"),
                     "reward_accuracy": tr.get("reward_accuracy"),
                     "reward_accuracy_distinct": tr.get("reward_accuracy_distinct"),
                     "identical": g.get("identical"), "truncated": g.get("truncated"),
                     "prompts": g.get("prompts"), "generate_s": g.get("seconds"),
                     "reference_s": r.get("seconds"), "train_s": tr.get("seconds"),
                     "eval_loss": tr.get("eval_loss")})
    return rows


def write_summary(out: Path, stage, num_iterations: int) -> None:
    rows = summary_rows(stage, num_iterations)
    atomic_write_json(out / "summary.json", rows)
    atomic_write_text(out / "summary.md", format_table(rows))


# theta_t is the iteration's starting model (generator and reference), theta_t+1 the model it trains
COLUMNS = [("iteration", "iter"), ("loss", "loss"), ("ref_real", "logp real θt"), ("policy_real", "logp real θt+1"),
           ("ref_generated", "logp gen θt"), ("policy_generated", "logp gen θt+1"), ("reward_margin", "margin"),
           ("reward_accuracy", "accuracy"), ("reward_accuracy_distinct", "accuracy (distinct pairs)"),
           ("identical", "generated = real"), ("truncated", "truncated"), ("generate_s", "generate s"),
           ("reference_s", "reference s"), ("train_s", "train s"), ("eval_loss", "eval loss")]


def format_table(rows: list[dict]) -> str:
    def cell(v):
        if v is None:
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        tr = "-" if r["truncated"] is None else f"{r['truncated']}/{r['prompts']}"
        lines.append("| " + " | ".join(tr if k == "truncated" else cell(r[k]) for k, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


