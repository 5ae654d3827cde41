"""What a long-running command says while it works: numbered stage lines with their durations, and progress bars
that appear only where a person reads them (rank 0, ``disable_tqdm`` off)."""
from __future__ import annotations

import contextlib
import sys
import time


def duration(seconds: float) -> str:
    """``0.4 s``, ``12 s``, ``3 min 05 s``, ``1 h 02 min``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, s = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Stages:
    """Numbered stages of a command: ``[2/5] NEFTune run`` when a stage starts and ``[2/5] NEFTune run: done in 95 s``
    when it ends. ``speak`` false (ranks other than 0) keeps the count and says nothing."""

    def __init__(self, total: int, speak: bool = True, say=None):
        self.total, self.done, self.speak = total, 0, speak
        self.say = say or (lambda text: print(text, flush=True))  # or a logger's info, for a recipe

    def _say(self, text: str) -> None:
        if self.speak:
            self.say(text)

    @contextlib.contextmanager
    def __call__(self, what: str):
        self.start(what)
        yield
        self.end()

    def start(self, what: str) -> None:
        self.done += 1
        self._tag, self._start = f"[{self.done}/{self.total}] {what}", time.perf_counter()
        self._say(self._tag)

    def end(self) -> None:
        self._say(f"{self._tag}: done in {duration(time.perf_counter() - self._start)}")

    def skip(self, what: str, why: str = "done earlier") -> None:
        """A stage a resumed run does not redo: counted and named, so the numbers stay those of the whole run."""
        self.done += 1
        self._say(f"[{self.done}/{self.total}] {what}: {why}")


def bar(iterable, desc: str | None, total: int | None = None, unit: str = "batch"):
    """``iterable`` with a progress bar on stderr when ``desc`` is given (None: no bar); the bar goes away when done,
    so it does not pile up under the Trainer's own bar."""
    if desc is None:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)
