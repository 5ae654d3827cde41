"""`tunesmith eval`: the NEFTune paper's measurements for one run, written as one JSON file.

* ``model`` + ``tasks``: lm-evaluation-harness benchmarks on the model in memory (named tasks or local task YAML
  files; see :mod:`tunesmith.evaluation.lm_eval_bridge`).

* ``model`` + ``dataset``: noise-free, token-weighted loss and perplexity of the model on the dataset's responses
  (the same masking and template as training; NEFTune Fig. 4 compares this on training and held-out data).
* ``generations`` (files from ``tunesmith generate``): per file, answer lengths, rep-2/3/4, diversity and
  log-diversity on the first ``n_tokens`` whitespace tokens (Table 4), the count of outputs cut at
  ``max_new_tokens``, and ROUGE-L / BLEU against reference answers (Fig. 5: generations on training prompts vs the
  training answers). References come from each row's ``reference`` field (written by ``tunesmith generate`` when the
  prompts file has answers) or from ``references``, a dataset matched by instruction AND input (Alpaca rows that share
  an instruction, e.g. "Summarize the text.", differ by their input). ``diversity_mode`` picks rep-n as written
  (``formula``) or as the paper's SimCTG code computes it (``paper``); the JSON and the report say which.

Save it as ``RUN_DIR/eval.json`` and ``tunesmith report`` picks it up.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tunesmith.config import field
from tunesmith.errors import UserError
from tunesmith.evaluation import metrics as M
from tunesmith.evaluation.genfile import read_generations


@dataclass
class EvalConfig:
    output: str = field("", "result JSON (put it at RUN_DIR/eval.json for the report)")
    model_name_or_path: str = field("", "model directory, for loss / perplexity on "
                                        "'dataset' and for 'tasks'")
    dataset: str | list | None = field(None, "dataset(s) (any SFT format) to score the model's loss on, each on its "
                                             "own: train.jsonl,heldout.jsonl or a YAML list of sources")
    dataset_format: str = field("auto", "format of 'dataset' and 'references'")
    dataset_split: str = field("train", "split, for hub datasets")
    template: str = field("", "prompt template (default: the model's saved one)")
    max_length: int = field(512, "truncate scored examples to this many tokens")
    batch_size: int = field(8, "batch size for scoring")
    dtype: str = field("float32", "float32, bfloat16, float16")
    generations: list[str] = field([], "generation file(s) to measure")
    references: str | list = field("", "dataset whose answers are the references, matched by "
                                "instruction and input (default: each row's 'reference' "
                                "field)")
    n_tokens: int | Literal["auto"] = field("auto", "rep-n / diversity use the first N whitespace tokens of each "
                                                    "answer; auto: per generation file, the largest N that keeps at "
                                                    "least 80% of the answers (the paper's fixed N: 50 Alpaca, 100 "
                                                    "Evol-Instruct, 150 ShareGPT)")
    diversity_mode: Literal["formula", "paper"] = field("formula", "formula: rep-n as defined; paper: as the NEFTune "
                                                                   "paper's numbers were computed (SimCTG's code: "
                                                                   "each answer's last n-gram skipped, rep-n rounded "
                                                                   "to 2 decimals)")
    run_name: str = field("", "name shown in reports (default: the output's folder)")
    tasks: list[str] = field([], "lm-evaluation-harness tasks: names (arc_easy, mmlu, ...) and/or task .yaml files")
    task_include_path: list[str] = field([], "extra folders of lm-eval task "
                                             "YAML files")
    num_fewshot: int | None = field(None, "lm-eval few-shot examples (task default)")
    task_limit: int = field(0, "lm-eval: only the first N documents per task (0: all)")
    overwrite: bool = field(False, "replace an existing output file that this command "
                                   "did not write (never an input, never a run's own file)")

    def __post_init__(self):
        if not self.output:
            raise UserError("'output' is required")
        from tunesmith.data.source import check_sources
        from tunesmith.io import resolve_path
        from tunesmith.rundir import check_output_file

        check_sources(self.dataset, "dataset", weights=False)
        check_sources(self.references, "references", weights=False)
        if self.model_name_or_path:
            self.model_name_or_path = resolve_path(self.model_name_or_path)
        check_output_file(self.output, "output", command="eval", overwrite=self.overwrite, inputs={
            "model_name_or_path": self.model_name_or_path, "dataset": self.dataset, "generations": self.generations,
            "references": self.references, "tasks": [t for t in self.tasks if t.endswith((".yaml", ".yml"))],
            "task_include_path": self.task_include_path})
        if (self.dataset or self.tasks) and not self.model_name_or_path:
            raise UserError("'dataset' and 'tasks' need 'model_name_or_path' (the model to evaluate)")
        if not self.dataset and not self.generations and not self.tasks:
            raise UserError("nothing to evaluate: give 'model_name_or_path' + 'dataset' / 'tasks', and/or "
                            "'generations'")
        from tunesmith import checks

        checks.at_least("batch_size", self.batch_size, 1)
        checks.at_least("max_length", self.max_length, 2)
        checks.non_negative("num_fewshot", self.num_fewshot, optional=True)
        checks.non_negative("task_limit", self.task_limit, why="0 = all")
        least = 5 if self.diversity_mode == "paper" else 4
        if self.n_tokens != "auto" and self.n_tokens < least:
            raise UserError(f"n_tokens must be at least {least} (rep-4 needs a 4-gram"
                            f"{', and paper mode skips the last one' if least == 5 else ''}), got {self.n_tokens}")


def dataset_loss_of(model, tokenizer, template, source, cfg: EvalConfig) -> dict:
    """Noise-free loss of the model on one source (tokenized through the data entry, and cached like training
    data)."""
    import numpy as np

    from tunesmith.data.collate import Collator
    from tunesmith.data.source import tokenize_sources
    from tunesmith.scoring import rows_loss

    rows, summary = tokenize_sources([source], tokenizer, template, cfg.max_length)
    rows = rows[np.argsort(rows.lengths, kind="stable")]  # less padding; the token-weighted sum is order-free
    result = rows_loss(model, rows, Collator(tokenizer.pad_token_id), cfg.batch_size,
                       device=next(model.parameters()).device, desc=f"noise-free loss on {source.name}")
    return result | {"examples": summary.kept, "dropped": len(summary.dropped), "truncated": summary.truncated}


def reference_map(value, cfg: EvalConfig) -> dict[tuple[str, str], str]:
    """(instruction, input) -> reference answer; the first record wins where a prompt repeats."""
    from tunesmith.data.source import read_examples

    refs = {}
    for ex in read_examples(value, split=cfg.dataset_split, dataset_format=cfg.dataset_format, key="references"):
        if ex.text is None and ex.turns[-1].response is not None:
            refs.setdefault((ex.turns[-1].prompt, ex.input or ""), ex.turns[-1].response)
    if not refs:
        raise UserError(f"{value}: empty reference set (no record with an answer)")
    return refs


def generation_stats(path: str, n_tokens: int | str, refs: dict[tuple[str, str], str] | None = None,
                     diversity_mode: str = "formula") -> dict:
    gens = read_generations(path)
    outputs = [g.output for g in gens]
    out = {"file": str(path), "generator": gens[0].generator, "n": len(gens),
           "truncated": sum(bool(g.row.get("truncated")) for g in gens),
           "decoding": gens[0].row.get("decoding"),
           "length": M.lengths(outputs), "diversity": M.rep_diversity(outputs, n_tokens, mode=diversity_mode)}
    if refs is not None:
        missing = [g for g in gens if g.key not in refs]
        if missing:
            what = "instruction and input" if missing[0].input else "instruction"
            raise UserError(f"{missing[0].loc}: field 'instruction': no reference answer with this {what}")
        references = [refs[g.key] for g in gens]
    elif all("reference" in g.row for g in gens):
        references = [str(g.row["reference"]) for g in gens]
    else:
        references = None
    if references is not None:
        ov = M.overlap(outputs, references)
        out["overlap"] = ov | {"rouge_l_median": statistics.median(ov["rouge_l"]),
                               "bleu_sentence_median": statistics.median(ov["bleu"])}
    else:
        out["overlap"] = None
        out["overlap_note"] = "no references: rows lack 'reference' and no 'references' dataset was given"
    return out


def run(cfg: EvalConfig) -> dict:
    from tunesmith.io import atomic_write_json

    result = {"run": cfg.run_name or Path(cfg.output).resolve().parent.name, "n_tokens": cfg.n_tokens,
              "diversity_mode": cfg.diversity_mode, "log_diversity_cap": M.LOG_DIVERSITY_CAP}
    if cfg.dataset or cfg.tasks:
        from tunesmith.models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(cfg.model_name_or_path, dtype=cfg.dtype)
        result["model"] = cfg.model_name_or_path
    if cfg.dataset:
        from tunesmith.data.source import model_template, open_sources

        sources = open_sources(cfg.dataset, split=cfg.dataset_split, dataset_format=cfg.dataset_format)
        template = model_template(cfg.template, cfg.model_name_or_path, tokenizer, sources)
        result["loss"] = {s.spec.name or s.spec.path: dataset_loss_of(model, tokenizer, s.template(template, tokenizer),
                                                                      s, cfg) for s in sources}
    if cfg.tasks:
        from tunesmith.evaluation.lm_eval_bridge import run_tasks

        result["benchmarks"] = run_tasks(model, tokenizer, cfg.tasks, include_path=cfg.task_include_path,
                                         num_fewshot=cfg.num_fewshot, limit=cfg.task_limit or None,
                                         batch_size=cfg.batch_size)
    refs = reference_map(cfg.references, cfg) if cfg.references else None
    result["generations"] = {}
    for path in cfg.generations:
        stats = generation_stats(path, cfg.n_tokens, refs, cfg.diversity_mode)
        name, k = Path(path).stem, 2
        while name in result["generations"]:  # two files with the same name from different folders
            name, k = f"{Path(path).stem}-{k}", k + 1
        result["generations"][name] = stats
    atomic_write_json(cfg.output, result, command="eval")
    print(format_result(result))
    return result


def _fmt(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


def format_result(r: dict) -> str:
    lines = [f"run {r['run']}"]
    for src, v in (r.get("loss") or {}).items():
        lines.append(f"  loss on {src}: {v['loss']:.4f} (perplexity {v['perplexity']:.2f}, {v['tokens']} tokens, "
                     f"{v['examples']} examples, noise-free)")
    for task, ms in ((r.get("benchmarks") or {}).get("results") or {}).items():
        lines.append(f"  {task}: " + "  ".join(f"{k} {_fmt(v, 4)}" for k, v in ms.items()))
    for name, g in r["generations"].items():
        d, ln = g["diversity"], g["length"]
        lines.append(f"  {name}: n={g['n']} chars {_fmt(ln.get('chars_mean'), 1)} words "
                     f"{_fmt(ln.get('words_mean'), 1)} "
                     f"rep-2 {_fmt(d['rep_2'])} rep-3 {_fmt(d['rep_3'])} rep-4 {_fmt(d['rep_4'])} "
                     f"diversity {_fmt(d['diversity'], 3)} log-div {_fmt(d['log_diversity'])} "
                     f"({d.get('mode', 'formula')} mode, first {d['n_tokens']} words"
                     f"{' (auto)' if str(d.get('n_tokens_rule', '')).startswith('auto') else ''}; "
                     f"{d['n_too_short']} shorter left "
                     f"out; cut at budget "
                     f"{g['truncated']})")
        if g["overlap"]:
            o = g["overlap"]
            lines.append(f"    vs references: ROUGE-L {o['rouge_l_mean']:.4f}  BLEU corpus {o['bleu_corpus']:.2f} "
                         f"sentence mean {o['bleu_sentence_mean']:.2f}")
    return "\n".join(lines)


def cli(argv: list[str]) -> int:
    from tunesmith.config import parse_cli

    cfg = parse_cli(EvalConfig, argv, "eval", "Loss / perplexity on datasets (noise-free) and length, repetition, "
                                              "diversity and ROUGE-L / BLEU of generation files; writes JSON.")
    if cfg is None:
        return 0
    run(cfg)
    return 0
