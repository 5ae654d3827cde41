"""The `tunesmith` command: a thin dispatcher. Each subcommand lives in its own module as ``cli(argv) -> int``."""
from __future__ import annotations

import importlib
import logging
import os
import sys

from tunesmith.config import printable
from tunesmith.errors import Stopped, UserError, write_failure

# name -> (module, one-line help). Modules are imported lazily so `tunesmith --help` stays fast.
COMMANDS = {
    "sft": ("tunesmith.recipes.sft.run", "supervised fine-tuning (full, LoRA, QLoRA), optional NEFTune"),
    "audit": ("tunesmith.recipes.sft.audit", "show rendered examples with trained tokens marked, and a data summary"),
    "merge": ("tunesmith.models", "fold a LoRA adapter into its base model"),
    "spin": ("tunesmith.recipes.spin.run", "SPIN self-play fine-tuning: all iterations in one resumable run"),
    "dpo": ("tunesmith.recipes.dpo.run",
            "preference training on your pairs: DPO, hinge, IPO, DPO-Positive, SimPO, ORPO"),
    "generate": ("tunesmith.generate", "batched generation with a model's saved prompt template"),
    "chat": ("tunesmith.serve.chat", "talk to a model in the terminal (streamed, its training prompt template)"),
    "serve": ("tunesmith.serve.run", "OpenAI-compatible API + web page (chat, blind side-by-side) for trained models"),
    "classify": ("tunesmith.recipes.classify.run",
                 "sequence classification (LoRA or full), metrics each epoch, best checkpoint"),
    "predict": ("tunesmith.recipes.classify.predict", "label sentences or a data file with a trained classifier"),
    "judge": ("tunesmith.evaluation.judge", "pairwise judging of two generation files; win rates with intervals"),
    "eval": ("tunesmith.evaluation.evaluate", "loss/perplexity, lengths, repetition, diversity, ROUGE-L/BLEU; JSON"),
    "report": ("tunesmith.evaluation.report", "Markdown + HTML report with plots comparing runs"),
    "plan": ("tunesmith.plan", "peak GPU memory per device for a config: DDP, FSDP, ZeRO-2/3; full, LoRA, QLoRA"),
    "demo": ("tunesmith.demo.run", "fine-tune the shipped tiny model with and without NEFTune, compare in a report"),
    "selftest": ("tunesmith.selftest.run",
                 "check training works here (GPU or --quick CPU form): table + selftest.json"),
}

USAGE = ("usage: tunesmith COMMAND [--config FILE] [--key value ...]\n"
         "       tunesmith COMMAND --help     (its keys)\n"
         "       tunesmith --version\n\ncommands:\n")


def _usage() -> str:
    return USAGE + "".join(f"  {name:<10} {helptext}\n" for name, (_, helptext) in COMMANDS.items())


def _suggest(name: str) -> str:
    import difflib

    close = difflib.get_close_matches(name, COMMANDS, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage(), end="")
        return 0
    if argv[0] in ("-V", "--version"):
        from tunesmith import __version__

        print(f"tunesmith {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"tunesmith: unknown command '{printable(name)}'{_suggest(name)}\n" + _usage(), end="", file=sys.stderr)
        return 2
    if any(a in ("-h", "--help") for a in rest):
        from tunesmith.reference import command_help

        text = command_help(name)  # from the committed reference: no torch / transformers import
        if text is not None:
            print(text, end="")
            return 0
    try:
        from tunesmith.reference import check_flags

        check_flags(name, rest)  # a misspelt flag fails here, in a fraction of a second, not after torch loads
    except UserError as e:
        print(f"tunesmith {name}: error: {e}", file=sys.stderr)
        return 2
    # Offline by default: nothing reaches the hub unless the user opts in.
    if os.environ.get("TUNESMITH_ONLINE") != "1":
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            os.environ.setdefault(var, "1")
    # bitsandbytes warns on every import on CPUs with AVX512-BF16 that an optional hub-downloaded kernel is missing.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        from tunesmith.quiet import known_harmless

        module = importlib.import_module(COMMANDS[name][0])
        with known_harmless():  # library warnings known to be harmless here; the user's own code keeps them all
            return int(module.cli(rest) or 0)
    except UserError as e:
        print(f"tunesmith {name}: error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(f"tunesmith {name}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"tunesmith {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a full disk surfaces as whatever the writing library raises
        failure = write_failure(e)
        if failure is None:
            raise
        print(f"tunesmith {name}: error: {failure}; what was written before stays (a training run resumes from its "
              f"newest complete checkpoint with --resume_from_checkpoint true once there is space)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
