"""Range checks for numeric settings: one line naming the key, before any work. Each config part calls these from
its ``__post_init__`` for its own keys (the checks live where the keys live)."""
from __future__ import annotations

import math

from tunesmith.errors import UserError

SEED_MAX = 2**32 - 1  # numpy's and torch's seeding accept 0 .. 2**32 - 1


def number(key: str, value, *, low=None, high=None, low_open: bool = False, high_open: bool = False,
           optional: bool = False, why: str = "") -> None:
    """Refuse a value that is not a finite number in [low, high] (``low_open`` / ``high_open``: the bound itself is
    excluded). ``optional``: None is accepted. ``why``: a hint appended to the message."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"field '{key}' must be a number, got {value!r}")
    if not math.isfinite(value):
        raise UserError(f"field '{key}' must be a finite number, got {value}")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        raise UserError(f"field '{key}' must be {_describe(low, high, low_open, high_open)}, got {value}"
                        + (f" ({why})" if why else ""))


def _show(bound) -> str:
    return str(int(bound)) if float(bound).is_integer() and abs(bound) < 1e15 else f"{bound:g}"


def _describe(low, high, low_open, high_open) -> str:
    if low is not None and high is not None:
        left, right = ("(" if low_open else "["), (")" if high_open else "]")
        return f"in {left}{_show(low)}, {_show(high)}{right}"
    if low is not None:
        return f"{'>' if low_open else '>='} {_show(low)}"
    return f"{'<' if high_open else '<='} {_show(high)}"


def positive(key: str, value, **kw) -> None:
    number(key, value, low=0, low_open=True, **kw)


def non_negative(key: str, value, **kw) -> None:
    number(key, value, low=0, **kw)


def at_least(key: str, value, low: int, *, optional: bool = False, why: str = "") -> None:
    if value is None and optional:
        return
    number(key, value, optional=optional)
    if value < low:
        raise UserError(f"field '{key}' must be at least {low}, got {value}" + (f" ({why})" if why else ""))


def fraction(key: str, value, *, closed_high: bool = False, **kw) -> None:
    """0 <= value < 1 (or <= 1)."""
    number(key, value, low=0, high=1, high_open=not closed_high, **kw)


def seed(key: str, value, **kw) -> None:
    number(key, value, low=0, high=SEED_MAX, **kw)
