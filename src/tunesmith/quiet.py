"""Silence, inside tunesmith's commands only, library messages known to be harmless there — so that what is printed
is what matters. Nothing here changes a filter or a logger for the user's own code: each helper is a context
manager, and `tunesmith.cli` wraps a command in :func:`known_harmless`."""
from __future__ import annotations

import contextlib
import logging
import warnings

# (category, start of the message, why it is harmless where tunesmith meets it)
KNOWN_WARNINGS = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated",
     "peft asks transformers 5 for the old name of a property whenever it wraps a model"),
    (UserWarning, r"'pin_memory' argument is set as true but no accelerator is found",
     "torch's DataLoader on a CPU-only machine: there is no device memory to pin"),
)


@contextlib.contextmanager
def known_harmless():
    """While a tunesmith command runs: ignore :data:`KNOWN_WARNINGS` (and nothing else)."""
    with warnings.catch_warnings():
        for category, message, _ in KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


@contextlib.contextmanager
def logger_level(name: str, level: int):
    """Raise the level of logger ``name`` for the duration of the block (e.g. transformers' load report for a
    classification head that is new on purpose; tunesmith says that in its own words)."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(max(level, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        logger.setLevel(before)
