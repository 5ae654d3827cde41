"""Benchmarks through lm-evaluation-harness (``pip install 'tunesmith[lm-eval]'``), on a model already in memory.

``run_tasks(model, tokenizer, ["arc_easy", "path/to/my_task.yaml"])`` wraps the model in lm-eval's ``HFLM`` (no
reload, no copy) and runs named tasks (MMLU, ARC, HellaSwag, TruthfulQA ... when their data is in the local HF cache
or the network is allowed) or local task YAML files (any directory of them can be added with ``include_path``).
Offline by default: a task whose data is not reachable fails with a one-line error naming it.

From the command line: ``tunesmith eval --model RUN --tasks arc_easy,my_task.yaml --output RUN/eval.json``.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from tunesmith.errors import UserError, first_line
from tunesmith.models import eval_mode

_TASK_NAME = re.compile(r"^task:\s*['\"]?([^'\"\s#]+)", re.MULTILINE)


def _import():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("benchmarks need lm-evaluation-harness: pip install 'tunesmith[lm-eval]'") from None
    return lm_eval, HFLM, TaskManager


def resolve_tasks(tasks: list[str], include_path: list[str] | None = None) -> tuple[list[str], list[str]]:
    """Task names, with any ``*.yaml`` path replaced by the task name it defines and its folder added to the
    include path. Returns (names, include paths)."""
    names, paths = [], list(include_path or [])
    for t in tasks:
        if t.endswith((".yaml", ".yml")):
            p = Path(t)
            if not p.is_file():
                raise UserError(f"{t}: task file not found")
            m = _TASK_NAME.search(p.read_text(encoding="utf-8"))
            if not m:
                raise UserError(f"{t}: no 'task:' name in the task file")
            names.append(m.group(1))
            if str(p.parent.resolve()) not in paths:
                paths.append(str(p.parent.resolve()))
        else:
            names.append(t)
    for p in paths:
        if not Path(p).is_dir():
            raise UserError(f"{p}: task include_path is not a directory")
    return names, paths


def run_tasks(model, tokenizer, tasks: list[str], *, include_path: list[str] | None = None,
              num_fewshot: int | None = None, limit: int | float | None = None, batch_size: int = 8,
              apply_chat_template: bool = False, bootstrap_iters: int = 1000, seed: int = 0,
              include_defaults: bool | None = None) -> dict:
    """Evaluate ``model`` in memory. Returns ``{"results": {task: {metric: value, metric_stderr: value}},
    "versions": ..., "n_samples": ...}`` with lm-eval's metric names (``acc``, ``acc_norm``, ...).

    ``include_defaults`` (default: only when a task is given by name) indexes lm-eval's ~15k bundled task files,
    which takes ~25 s; runs with only local task files skip it."""
    lm_eval, HFLM, TaskManager = _import()
    if not tasks:
        raise UserError("no tasks given")
    names, paths = resolve_tasks(tasks, include_path)
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    if include_defaults is None:
        include_defaults = any(not t.endswith((".yaml", ".yml")) for t in tasks)
    manager = TaskManager(include_path=paths or None, include_defaults=include_defaults)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task '{unknown[0]}' (a task name, or a path to a task .yaml file)")
    try:
        with eval_mode(model):
            out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                          task_manager=manager, apply_chat_template=apply_chat_template,
                                          bootstrap_iters=bootstrap_iters, log_samples=False, random_seed=seed,
                                          numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    except (ConnectionError, OSError) as e:
        raise UserError(f"lm-eval tasks {names}: data not reachable ({first_line(e)[:200]}); offline "
                        f"runs need the dataset in the local cache or a local task file") from None
    results = {}
    for task, metrics in out["results"].items():
        clean = {}
        for key, value in metrics.items():
            if key in ("alias", "sample_len") or not isinstance(value, (int, float)):
                continue
            name = key.split(",")[0]  # "acc,none" -> "acc"
            clean[name] = None if isinstance(value, float) and math.isnan(value) else value
        results[task] = clean
    return {"results": results, "versions": {k: str(v) for k, v in out.get("versions", {}).items()},
            "n_samples": {k: v for k, v in out.get("n-samples", {}).items()}}
