"""`tunesmith selftest`: run the checks, print the table, write selftest.json / selftest.md, exit non-zero on a fail.

Each check is a function ``fn(ctx, record)`` (see :mod:`tunesmith.selftest.checks`): it puts its measurements in
``record.figures``, records a broken expectation with ``record.expect(ok, message)`` (the check fails, and goes on
measuring), and ends early with ``record.skip(reason)``. The runner turns a :class:`Spec` whose optional module does
not import, or which needs CUDA on a CPU run, into a skip with its reason, and an exception into a fail with the
exception's first line (the traceback goes to ``selftest.log``); every other check still runs.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.config import _f
from tunesmith.errors import UserError, first_line

PASS, FAIL, SKIP = "pass", "fail", "skip"


class SkipCheck(Exception):
    """Raised by :meth:`Record.skip`: the check cannot run here (the reason says why)."""


@dataclass
class Record:
    """What one check reports: ``figures`` (name -> number or text) and the expectations it found broken."""

    name: str
    figures: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def expect(self, ok: bool, message: str) -> bool:
        if not ok:
            self.problems.append(message)
        return bool(ok)

    def skip(self, reason: str):
        raise SkipCheck(reason)


@dataclass(frozen=True)
class Spec:
    """One row of the self-test: the issue's check ``number``, a ``name``, the function, the optional modules it needs
    (not installed: a skip) and whether it needs CUDA (a skip on a CPU run, with ``cpu_reason``)."""

    number: str
    name: str
    fn: Callable
    requires: tuple[str, ...] = ()
    cuda_only: bool = False
    cpu_reason: str = "needs a CUDA device (this run is on the CPU)"


@dataclass
class Context:
    """What the checks share: device, sizes, a scratch directory, the log, and results later checks read."""

    device: str
    quick: bool
    sizes: object
    work: Path
    output: Path
    log_path: Path
    shared: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def bf16(self) -> bool:
        """A GPU with bfloat16 (Ampere and later)."""
        if not self.cuda:
            return False
        import torch

        return torch.cuda.is_bf16_supported()

    @property
    def dtype(self) -> str:
        """The dtype of the weights the checks build and load: what ``dtype: auto`` gives for a bf16 checkpoint
        (bfloat16 on a GPU that has it, else float32, with fp16 mixed precision on older GPUs)."""
        return "bfloat16" if self.bf16 else "float32"

    @property
    def mixed_precision(self) -> str | None:
        """The autocast ``dtype: auto`` turns on: bf16 (or fp16 on an older GPU) on CUDA, none on a CPU."""
        return ("bf16" if self.bf16 else "fp16") if self.cuda else None

    def once(self, key: str, make: Callable):
        """``make()`` the first time ``key`` is asked for (models and data files several checks use)."""
        if key not in self.shared:
            self.shared[key] = make()
        return self.shared[key]


def unavailable(spec: Spec, ctx: Context) -> tuple[str, str] | None:
    """(status, reason) when ``spec`` cannot run here: an optional module that is not installed (skip) or that is
    installed but does not import (fail: a broken install), or CUDA needed on a CPU run (skip)."""
    if spec.cuda_only and not ctx.cuda:
        return SKIP, spec.cpu_reason
    for module in spec.requires:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return SKIP, f"{module} is not installed (optional)"
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - any import failure of an installed package is reported as such
            return FAIL, f"{module} is installed but does not import: {type(e).__name__}: {first_line(e)}"
    return None


def run_check(spec: Spec, ctx: Context, log) -> dict:
    """Run one check; returns ``{name, status, figures, reason}``. Never raises but for KeyboardInterrupt."""
    from tunesmith.selftest.measure import free_memory

    record = Record(spec.name)
    start = time.perf_counter()
    blocked = unavailable(spec, ctx)
    if blocked is not None:
        status, reason = blocked
    else:
        try:
            spec.fn(ctx, record)
        except SkipCheck as e:
            status, reason = SKIP, str(e)
        except Exception as e:  # noqa: BLE001 - a check that raises is a fail; the others still run
            status, reason = FAIL, f"{type(e).__name__}: {first_line(e)}"
            print(f"--- {spec.name}: traceback\n{traceback.format_exc()}", file=log, flush=True)
        else:
            status, reason = (FAIL, "; ".join(record.problems)) if record.problems else (PASS, "")
        finally:
            free_memory()
    if blocked is None:
        record.figures["seconds"] = round(time.perf_counter() - start, 1)
    return {"name": spec.name, "status": status, "figures": record.figures, "reason": reason}


# ------------------------------------------------------------------------------------------------ report


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {fmt(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    return str(value)


def figures_text(figures: dict) -> str:
    return "; ".join(f"{k} {fmt(v)}" for k, v in figures.items())


def table(results: list[dict], specs: list[Spec], width: int = 118) -> str:
    import textwrap

    numbers = {s.name: s.number for s in specs}
    name_w = max([len(r["name"]) for r in results] + [5])
    lines = [f"{'#':<4}{'check':<{name_w + 2}}{'status':<8}figures / reason", "-" * width]
    indent = " " * (4 + name_w + 2 + 8)
    for r in results:
        text = figures_text(r["figures"])
        if r["reason"]:
            text = f"{r['reason']}" + (f" | {text}" if text else "")
        wrapped = textwrap.wrap(text, width - len(indent)) or [""]
        lines.append(f"{numbers.get(r['name'], ''):<4}{r['name']:<{name_w + 2}}{r['status'].upper():<8}{wrapped[0]}")
        lines += [indent + w for w in wrapped[1:]]
    return "\n".join(lines) + "\n"


def markdown(results: list[dict], specs: list[Spec], header: dict) -> str:
    numbers = {s.name: s.number for s in specs}
    counts = {s: sum(r["status"] == s for r in results) for s in (PASS, FAIL, SKIP)}
    lines = ["# tunesmith selftest", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += [f"- result: {counts[PASS]} pass, {counts[FAIL]} fail, {counts[SKIP]} skip", "",
              "| # | check | status | figures | reason |", "|---|---|---|---|---|"]
    for r in results:
        cells = [numbers.get(r["name"], ""), r["name"], r["status"], figures_text(r["figures"]), r["reason"]]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ the run


@dataclass
class SelftestArgs:
    """Selftest"""

    quick: bool = _f(False, "Tiny sizes (the CPU form, a few minutes at most); implied on a machine without CUDA.")
    device: str = _f("auto", "auto (cuda when torch sees a GPU, else cpu), cuda or cpu.")
    output: str = _f("selftest-out", "Folder for selftest.json, selftest.md and selftest.log.")

    def __post_init__(self):
        if self.device not in ("auto", "cuda", "cpu"):
            raise UserError(f"field 'device' must be auto, cuda or cpu, got {self.device!r}")


def resolve_device(requested: str) -> str:
    import torch

    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        raise UserError(f"--device cuda: torch {torch.__version__} sees no CUDA device (use --device cpu or auto)")
    if requested == "auto":
        return "cuda" if available else "cpu"
    return requested


@contextlib.contextmanager
def quiet_libraries(log):
    """Library prints, warnings and progress bars go to ``log``; the console keeps the self-test's own lines."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    level = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
    handler = logging.StreamHandler(log)
    root = logging.getLogger()
    root.addHandler(handler)
    old_root = root.level
    root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("default")
                yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_root)
        transformers.utils.logging.set_verbosity(level)


def run_selftest(args: SelftestArgs, specs: list[Spec] | None = None, console=None) -> int:
    """Run ``specs`` (default: every check) and write the reports into ``args.output``. Returns the exit code: 1 when
    any check failed, else 0."""
    from tunesmith.io import atomic_write_json, atomic_write_text
    from tunesmith.rundir import check_output_dir
    from tunesmith.selftest import workspace

    console = console or sys.stdout
    output = check_output_dir(args.output, "output")
    device = resolve_device(args.device)
    quick = args.quick or device == "cpu"
    if specs is None:
        from tunesmith.selftest.checks import CHECKS

        specs = CHECKS
    output.mkdir(parents=True, exist_ok=True)
    log_path = output / "selftest.log"
    form = ("CPU form (--quick sizes: its speed figures are smoke values)" if device == "cpu"
            else "GPU form" + (" at --quick sizes" if quick else ""))
    print(f"tunesmith selftest: {len(specs)} checks on {device}, {form}; library output goes to {log_path}",
          file=console, flush=True)
    if device == "cpu" and not args.quick:
        print("(no CUDA device here: running the CPU form; the GPU-only checks are skipped)", file=console)
    work = Path(tempfile.mkdtemp(prefix="tunesmith-selftest-"))
    results = []
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    t0 = time.perf_counter()
    try:
        with open(log_path, "w", encoding="utf-8") as log:
            ctx = Context(device=device, quick=quick, sizes=workspace.QUICK if quick else workspace.GPU, work=work,
                          output=output, log_path=log_path)
            for i, spec in enumerate(specs, 1):
                print(f"[{i}/{len(specs)}] {spec.number} {spec.name} ...", end=" ", file=console, flush=True)
                print(f"=== {spec.number} {spec.name}", file=log, flush=True)
                with quiet_libraries(log):
                    result = run_check(spec, ctx, log)
                results.append(result)
                secs = result["figures"].get("seconds")
                print(result["status"].upper() + (f" ({secs} s)" if secs is not None else "")
                      + (f": {result['reason']}" if result["reason"] else ""), file=console, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    env = next((r["figures"] for r in results if r["name"] == "environment"), {})
    header = {"date": started, "device": env.get("device", device), "form": form,
              "versions": ", ".join(f"{k} {env[k]}" for k in ("tunesmith", "torch", "transformers", "trl") if k in env),
              "command": "tunesmith selftest" + (" --quick" if args.quick else "") + f" --device {args.device}",
              "wall seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_json(output / "selftest.json", results)
    atomic_write_text(output / "selftest.md", markdown(results, specs, header))
    print("\n" + table(results, specs), end="", file=console)
    failed = [r["name"] for r in results if r["status"] == FAIL]
    counts = {s: sum(r["status"] == s for r in results) for s in (PASS, FAIL, SKIP)}
    print(f"\n{counts[PASS]} pass, {counts[FAIL]} fail, {counts[SKIP]} skip in {header['wall seconds']} s; "
          f"wrote {output / 'selftest.json'} and {output / 'selftest.md'}", file=console)
    if failed:
        print(f"FAILED: {', '.join(failed)} (tracebacks in {log_path})", file=console)
    return 1 if failed else 0


def cli(argv: list[str]) -> int:
    from tunesmith.config import parse_cli

    args = parse_cli(SelftestArgs, argv, "selftest",
                     "Checks that training works on this machine: environment, SFT of a ~1B model against TRL, "
                     "packed = unpacked under every attention kernel, exact NEFTune in bf16, lean logits, LoRA and "
                     "QLoRA, plan vs measured memory, accelerate launch (FSDP2, DDP), one SPIN iteration. Prints a "
                     "table and writes selftest.json and selftest.md; exit code 1 when a check fails. Installs "
                     "nothing, needs no network.")
    if args is None:
        return 0
    return run_selftest(args)


__all__ = ["FAIL", "PASS", "SKIP", "Context", "Record", "SelftestArgs", "Spec", "cli", "run_selftest"]
