"""`tunesmith report RUN_A RUN_B ... --output DIR`: one Markdown + HTML report with PNG plots comparing runs.

Each RUN is a directory; the report reads what it finds there:

* ``metrics.jsonl`` (written by ``tunesmith sft``): loss curves — the training loss as optimised (with NEFTune noise
  when the run used it), the noise-free loss on training samples (``eval_train_loss``) and on held-out data
  (``eval_eval_loss``): the paper's Fig. 4;
* ``eval.json`` (``tunesmith eval --output RUN/eval.json``): loss/perplexity, the length / repetition / diversity
  table (Table 4) and ROUGE-L / BLEU against the references (Fig. 5).

Win rates come from ``--winrate`` (``winrate.json`` files or ``tunesmith judge`` output directories).
"""
from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

from tunesmith.config import field
from tunesmith.errors import UserError, at
from tunesmith.io import atomic_write_text

CURVES = (("loss", "training loss (as optimised; noisy if NEFTune)", "-"),
          ("eval_train_loss", "training-set loss, noise-free", "--"),
          ("eval_eval_loss", "held-out loss", ":"))


REPORT_FILES = ("report.md", "report.html", "loss_curves.png", "overlap.png", "winrates.png")


@dataclass
class ReportConfig:
    runs: list[str] = field([], "run directories (positional arguments)")
    output: str = field("report", "directory for report.md, report.html and plots")
    winrate: list[str] = field([], "winrate.json file(s) or judge output "
                                   "dir(s)")
    title: str = field("tunesmith report", "report title")
    overwrite: bool = field(False, "replace an existing output file that this command "
                                   "did not write (never an input, never a run's own file)")

    def __post_init__(self):
        if not self.runs and not self.winrate:
            raise UserError("nothing to report: give run directories (tunesmith report RUN_A RUN_B ...)")
        from tunesmith.rundir import check_output_dir

        check_output_dir(self.output, "output", command="report", files=REPORT_FILES, overwrite=self.overwrite,
                         inputs={"runs": self.runs, "winrate": self.winrate})


def read_metrics_log(path: Path) -> list[dict]:
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if lineno == len(lines):
                continue  # a torn last line (training still running or killed): skip it
            raise UserError(f"{at(path, lineno)}: invalid JSON") from None
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def load_run(path: str) -> dict:
    d = Path(path)
    if not d.is_dir():
        raise UserError(f"{d}: run directory not found")
    run = {"name": d.resolve().name, "dir": str(d), "log": [], "eval": None}
    if (d / "metrics.jsonl").exists():
        run["log"] = read_metrics_log(d / "metrics.jsonl")
    if (d / "eval.json").exists():
        try:
            run["eval"] = json.loads((d / "eval.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{at(d / 'eval.json', e.lineno)}: invalid JSON ({e.msg})") from None
    if not run["log"] and run["eval"] is None:
        raise UserError(f"{d}: neither metrics.jsonl nor eval.json found (run `tunesmith eval --output "
                        f"{d}/eval.json ...` first)")
    return run


def load_winrate(path: str) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "winrate.json"
    try:
        w = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{p}: win-rate file not found") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{at(p, e.lineno)}: invalid JSON ({e.msg})") from None
    for key in ("n", "wins", "draws", "win_rate"):
        if key not in w:
            raise UserError(f"{at(p, None, key)}: missing (not a tunesmith judge winrate.json)")
    return w | {"file": str(p)}


# ---------------------------------------------------------------- plots

def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Write a plot atomically (a kill never leaves half a PNG), recorded as the report's."""
    from tunesmith.io import atomic_path

    with atomic_path(path, command="report") as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def run_groups(runs: list[dict], per_panel: int = 4) -> list[list[tuple[str, list[dict]]]]:
    """Runs grouped for the loss panels: the seeds of one variant (``sft-seed0``, ``sft-seed1``) share a colour and a
    legend entry; at most ``per_panel`` entries a panel (more variants: more rows of panels)."""
    import re

    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(re.sub(r"-seed\d+$", "", run["name"]), []).append(run)
    items = list(groups.items())
    return [items[i:i + per_panel] for i in range(0, len(items), per_panel)]


CURVE_TITLES = {"loss": "training loss as optimised\n(with the noise when NEFTune is on)",
                "eval_train_loss": "training loss, noise-free\n(lower: closer fit to the training set)",
                "eval_eval_loss": "held-out loss\n(lower is better)"}


def plot_losses(runs: list[dict], path: Path) -> bool:
    fig = loss_figure(runs)
    if fig is None:
        return False
    save_figure(fig, path)
    pyplot().close(fig)
    return True


def loss_figure(runs: list[dict]):
    """One panel per curve (as optimised, noise-free training, held-out), one row per four run groups; each panel's
    legend names at most four groups. None when no run logged a loss."""
    def points(run, key):
        return [(r["step"], r[key]) for r in run["log"] if isinstance(r.get(key), (int, float))
                and math.isfinite(r[key])]

    keys = [key for key, _, _ in CURVES if any(points(run, key) for run in runs)]
    if not keys:
        return None
    plt = pyplot()
    rows = run_groups(runs)
    fig, axes = plt.subplots(len(rows), len(keys), figsize=(4.2 * len(keys), 3.4 * len(rows)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for r, row in enumerate(rows):
        for c, key in enumerate(keys):
            ax = axes[r][c]
            for g, (group, members) in enumerate(row):
                for m, run in enumerate(members):
                    pts = points(run, key)
                    if pts:
                        xs, ys = zip(*pts)
                        ax.plot(xs, ys, color=colors[g % len(colors)], marker="." if len(pts) < 30 else None,
                                alpha=0.85, label=group if m == 0 else None)
            ax.set_title(CURVE_TITLES[key], fontsize=9)
            ax.set_xlabel("optimizer step", fontsize=8)
            if c == 0:
                ax.set_ylabel("loss (nats / response token)", fontsize=8)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _horizontal_boxplot(ax, data):
    """A horizontal box plot with mean markers, through the keyword this matplotlib has (``orientation`` from 3.10,
    where ``vert`` is deprecated)."""
    import inspect

    kwargs = ({"orientation": "horizontal"} if "orientation" in inspect.signature(ax.boxplot).parameters
              else {"vert": False})
    return ax.boxplot(data, showmeans=True, **kwargs)


def plot_overlap(sets: list[tuple[str, dict]], path: Path) -> bool:
    fig = overlap_figure(sets)
    if fig is None:
        return False
    save_figure(fig, path)
    pyplot().close(fig)
    return True


def overlap_figure(sets: list[tuple[str, dict]]):
    """ROUGE-L and BLEU distributions per generation set, the median and mean markers named in a legend."""
    sets = [(name, g["overlap"]) for name, g in sets if g.get("overlap")]
    if not sets:
        return None
    plt = pyplot()
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 2, figsize=(10, 0.6 * len(sets) + 2.9))
    for ax, key, title in ((axes[0], "rouge_l", "ROUGE-L F vs reference"),
                           (axes[1], "bleu", "sentence BLEU vs reference")):
        boxes = _horizontal_boxplot(ax, [o[key] for _, o in sets])
        ax.set_yticks(range(1, len(sets) + 1), [n for n, _ in sets], fontsize=8)
        ax.set_title(title + "\n(higher: closer to the reference; on training prompts, more copying)", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
        median, mean = boxes["medians"][0], boxes["means"][0]
        ax.legend([Line2D([], [], color=median.get_color(), lw=median.get_linewidth()),
                   Line2D([], [], ls="", marker=mean.get_marker(), color=mean.get_markerfacecolor())],
                  ["median", "mean"], fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def plot_winrates(wrs: list[dict], path: Path) -> bool:
    wrs = [w for w in wrs if w.get("win_rate") is not None]
    if not wrs:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(wrs) + 1.8))
    ys = range(len(wrs))
    vals = [w["win_rate"] for w in wrs]
    err = [[v - (w.get("ci_low") if w.get("ci_low") is not None else v) for v, w in zip(vals, wrs)],
           [(w.get("ci_high") if w.get("ci_high") is not None else v) - v for v, w in zip(vals, wrs)]]
    ax.barh(list(ys), vals, xerr=err, capsize=4, color="#4c72b0")
    ax.axvline(50, color="gray", lw=1, ls="--")
    ax.set_yticks(list(ys), [f"{w.get('name_a', 'A')} vs {w.get('name_b', 'B')}" for w in wrs], fontsize=8)
    ax.set_xlim(0, 100)
    ax.set_xlabel("win rate of A over B, 100·(wins + ½·draws)/n, with bootstrap interval\n(above 50: A preferred; "
                  "50: no preference)")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- document

def _setting(v, code: bool = False) -> str:
    if v is None:
        return "–"
    if isinstance(v, list):
        return ", ".join(_setting(x, code) for x in v)
    text = f"{v:g}" if isinstance(v, float) else str(v)
    return f"`{text}`" if code else text


def run_settings(run: dict) -> dict | None:
    """How a run was trained, from the ``tunesmith.yaml`` of its directory or of the model its eval.json scored:
    method, weights trained, NEFTune alpha, learning rate, epochs, data. None when neither is there."""
    import yaml

    from tunesmith.rundir import read_owner

    candidates = [Path(run["dir"])] + [Path(m) for m in [(run["eval"] or {}).get("model")] if m]
    for d in candidates:
        if (d / "tunesmith.yaml").is_file():
            try:
                cfg = yaml.safe_load((d / "tunesmith.yaml").read_text(encoding="utf-8")) or {}
            except yaml.YAMLError:
                return None
            break
    else:
        return None
    owner = next((o for o in (read_owner(x) for x in [d, d.parent, d.parent.parent]) if o), None)
    method = (owner or {}).get("command") or ("spin" if "num_iterations" in cfg else
                                              "classify" if "label_column" in cfg else "sft")
    if method == "spin":
        method = f"spin ({cfg.get('num_iterations', '?')} iteration(s), beta {cfg.get('beta')})"
    r = cfg.get("lora_r")
    weights = (f"QLoRA r {r}" if cfg.get("load_in_4bit") else f"LoRA r {r}" if cfg.get("use_peft") else "full")
    steps = cfg.get("max_steps")
    epochs = f"{steps} steps" if isinstance(steps, int) and steps > 0 else cfg.get("num_train_epochs")
    return {"method": method, "weights": weights, "neftune": cfg.get("neftune_noise_alpha") or "off",
            "learning rate": cfg.get("learning_rate"), "epochs": epochs, "data": cfg.get("dataset")}


def _fmt(x, nd=2):
    if x is None:
        return "–"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def build_blocks(cfg: ReportConfig, runs: list[dict], wrs: list[dict], out: Path) -> list[tuple]:
    blocks: list[tuple] = [("h1", cfg.title)]
    blocks.append(("p", "Runs: " + ", ".join(f"{r['name']} ({r['dir']})" for r in runs) if runs else "No runs."))
    settings = [(r["name"], run_settings(r)) for r in runs]
    if any(s for _, s in settings):
        head = ["method", "weights", "neftune", "learning rate", "epochs", "data"]
        blocks += [("h2", "Settings"),
                   ("table", ["run"] + [h if h != "neftune" else "NEFTune alpha" for h in head],
                    [[name] + ([_setting(s[h], code=h == "data") for h in head] if s else ["–"] * len(head))
                     for name, s in settings])]

    if runs and plot_losses(runs, out / "loss_curves.png"):
        blocks += [("h2", "Loss"), ("p", "Solid: the training loss as optimised (with NEFTune noise when the run "
                                         "used it). Dashed: loss on training samples without noise. Dotted: "
                                         "held-out loss. NEFTune's Fig. 4: noise-free training loss higher with "
                                         "NEFT, held-out loss slightly lower."),
                   ("img", "loss_curves.png", "loss curves")]
    final_rows = []
    for r in runs:
        last = {}
        for row in r["log"]:
            for key, _, _ in CURVES:
                if key in row:
                    last[key] = row[key]
        for src, v in ((r["eval"] or {}).get("loss") or {}).items():
            final_rows.append([r["name"], f"`{src}` (tunesmith eval)", _fmt(v["loss"], 4), _fmt(v["perplexity"]),
                               str(v["tokens"])])
        for key, label, _ in CURVES:
            if key in last:
                final_rows.append([r["name"], f"{label} (last logged)", _fmt(float(last[key]), 4),
                                   _fmt(math.exp(min(float(last[key]), 50.0))), "–"])
    if final_rows:
        blocks += [("h3", "Final losses"), ("table", ["run", "measure", "loss", "perplexity", "tokens"],
                                            final_rows)]

    bench = [(r["name"], task, m) for r in runs
             for task, m in (((r["eval"] or {}).get("benchmarks") or {}).get("results") or {}).items()]
    if bench:
        rows = [[name, task, ", ".join(f"{k} {_fmt(v, 4)}" for k, v in m.items() if not k.endswith("_stderr")),
                 ", ".join(f"{k} {_fmt(v, 4)}" for k, v in m.items() if k.endswith("_stderr"))]
                for name, task, m in bench]
        blocks += [("h2", "Benchmarks (lm-evaluation-harness)"),
                   ("table", ["run", "task", "metrics", "standard errors"], rows)]

    sets = [(f"{r['name']} / {name}", g) for r in runs for name, g in ((r["eval"] or {}).get("generations") or
                                                                       {}).items()]
    if sets:
        rows = []
        for name, g in sets:
            ln, d = g["length"], g["diversity"]
            rows.append([name, str(g["n"]), _fmt(ln.get("chars_mean"), 1), _fmt(ln.get("words_mean"), 1),
                         _fmt(d["rep_2"]), _fmt(d["rep_3"]), _fmt(d["rep_4"]), _fmt(d["diversity"], 3),
                         _fmt(d["log_diversity"]), str(d["n_tokens"]), f"{d['n_used']} / {d['n_too_short']}",
                         str(g["truncated"])])
        n_tok = sorted({g["diversity"]["n_tokens"] for _, g in sets})
        auto = any(str(g["diversity"].get("n_tokens_rule", "")).startswith("auto") for _, g in sets)
        auto_note = "; auto: per generation file, the largest N that keeps at least 80% of its answers" if auto else ""
        mixed_note = (". N differs between rows: rep-n and diversity compare only at one N (set --n_tokens to one "
                      "value in every eval)") if len(n_tok) > 1 else ""
        modes = sorted({g["diversity"].get("mode", "formula") for _, g in sets})
        how = {"formula": "formula mode: rep-n = 100·(1 − unique n-grams / n-grams) over all n-grams of each answer",
               "paper": "paper mode: as the NEFTune paper's numbers were computed by SimCTG's code — each answer's "
                        "last n-gram is not counted and rep-n is rounded to 2 decimals"}
        blocks += [("h2", "Length, repetition and diversity (NEFTune Table 4)"),
                   ("p", f"Lengths over all answers. rep-n in {'; '.join(how[m] for m in modes)}"
                         f"{' (the runs do not all use the same mode: compare with care)' if len(modes) > 1 else ''}"
                         f"; diversity = "
                         f"∏(1 − rep-n/100) for n = 2..4; log-diversity = −log(1 − diversity), capped at 20. These "
                         f"use the first N whitespace tokens of each answer (column N{auto_note}); shorter answers "
                         f"are left out (column 'used / too short'){mixed_note}. 'cut' = outputs that hit the "
                         f"generation budget."),
                   ("table", ["run / generations", "n", "chars", "words", "rep-2", "rep-3", "rep-4", "diversity",
                              "log-div", "N", "used / too short", "cut"], rows)]
        ov = [(n, g) for n, g in sets if g.get("overlap")]
        if ov:
            rows = [[n, str(g["overlap"]["n"]), _fmt(g["overlap"]["rouge_l_mean"], 4),
                     _fmt(g["overlap"]["rouge_l_median"], 4), _fmt(g["overlap"]["bleu_corpus"]),
                     _fmt(g["overlap"]["bleu_sentence_mean"])] for n, g in ov]
            blocks += [("h2", "Overlap with the reference answers (NEFTune Fig. 5)"),
                       ("p", "ROUGE-L (LCS F-measure) and BLEU (up to 4-grams) of each generation against its "
                             "reference answer. On training prompts, lower means less copying of the training "
                             "answers."),
                       ("table", ["run / generations", "n", "ROUGE-L mean", "ROUGE-L median", "BLEU (corpus)",
                                  "BLEU (sentence mean)"], rows)]
            if plot_overlap(ov, out / "overlap.png"):
                blocks.append(("img", "overlap.png", "ROUGE-L and BLEU distributions"))
    if wrs:
        rows = []
        for w in wrs:
            pct = int(round(100 * w.get("confidence", 0.95)))
            ci = (f"[{_fmt(w.get('ci_low'))}, {_fmt(w.get('ci_high'))}]" if w.get("ci_low") is not None else "–")
            ci2 = (f"[{_fmt(w.get('ci_excluding_draws_low'))}, {_fmt(w.get('ci_excluding_draws_high'))}]"
                   if w.get("ci_excluding_draws_low") is not None else "–")
            rows.append([f"{w.get('name_a', 'A')} vs {w.get('name_b', 'B')}", str(w.get("judge", "")),
                         f"{w['wins']} / {w['draws']} / {w.get('losses', '–')}", str(w["n"]),
                         str(w.get("unjudged", 0)), f"{_fmt(w['win_rate'])} {ci}",
                         f"{_fmt(w.get('win_rate_excluding_draws'))} {ci2}", f"{pct}%"])
        blocks += [("h2", "Win rates"),
                   ("p", "Win rate (AlpacaEval) = 100·(wins + ½·draws)/n; win rate excluding draws (the NEFTune "
                         "human study's figure) = 100·wins/(n − draws). Intervals: percentile bootstrap over "
                         "prompts. n counts judged prompts; unjudged prompts are listed apart, never as draws."),
                   ("table", ["A vs B", "judge", "wins / draws / losses", "n", "unjudged",
                              "win rate [CI]", "excl. draws [CI]", "level"], rows)]
        if plot_winrates(wrs, out / "winrates.png"):
            blocks.append(("img", "winrates.png", "win rates with intervals"))
    return blocks


def to_markdown(blocks) -> str:
    out = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + b[1])
        elif kind == "p":
            out.append(b[1])
        elif kind == "img":
            out.append(f"![{b[2]}]({b[1]})")
        elif kind == "table":
            header, rows = b[1], b[2]
            esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
            out.append("\n".join(["| " + " | ".join(map(esc, header)) + " |",
                                  "|" + "---|" * len(header)] + ["| " + " | ".join(map(esc, r)) + " |" for r in rows]))
    return "\n\n".join(out) + "\n"


def to_html(blocks, title: str) -> str:
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse}"
           "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
           "img{max-width:100%}</style></head><body>"]
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{html.escape(b[1])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{html.escape(b[1]).replace('`', '')}</p>")
        elif kind == "img":
            out.append(f"<p><img src='{html.escape(b[1])}' alt='{html.escape(b[2])}'></p>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c)).replace('`', '')}</td>" for c in r) + "</tr>"
                           for r in b[2])
            out.append(f"<table><tr>{head}</tr>{rows}</table>")
    return "\n".join(out) + "\n</body></html>\n"


def run(cfg: ReportConfig) -> Path:
    runs = [load_run(r) for r in cfg.runs]
    wrs = [load_winrate(w) for w in cfg.winrate]
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    blocks = build_blocks(cfg, runs, wrs, out)
    atomic_write_text(out / "report.md", to_markdown(blocks), command="report")
    atomic_write_text(out / "report.html", to_html(blocks, cfg.title), command="report")
    print(f"report: {out / 'report.md'} and {out / 'report.html'} "
          f"({sum(1 for b in blocks if b[0] == 'img')} plots)")
    return out


def cli(argv: list[str]) -> int:
    from tunesmith.config import parse_cli

    cfg = parse_cli(ReportConfig, argv, "report RUN_DIR [RUN_DIR ...]", "Markdown + HTML report with plots comparing "
                    "runs.", positional="runs")
    if cfg is not None:
        run(cfg)
    return 0
