"""Progress of the long commands (``profile``, ``selftest``, every ``bench``, training): a tqdm bar
with the time left on a terminal, nothing at all elsewhere.

Users of such tools expect the bar and its estimate; a log, a pipe or CI expects no redraws and no
lines per step, so where the stream is not a terminal the bar is off. Three ways to count: steps
announced as they start (:meth:`Progress.step`: a step counts as done when the next one starts),
or seconds of a run of known length (:meth:`Progress.advance_to`), or the lines a command prints
as it goes, one per step (:meth:`Progress.say`: the benches that narrate their runs).
"""
from __future__ import annotations

import shutil
import sys
from typing import IO

from tqdm import tqdm

__all__ = ["Progress", "STDERR", "ticking"]

#: The default stream: sys.stderr as it is when the bar is made (tests swap it).
STDERR = object()
#: A step's label beside the bar is cut to this many characters (a long line would squeeze the bar).
STEP_LABEL_CHARS = 40


def _is_terminal(stream: object) -> bool:
    try:
        return bool(getattr(stream, "isatty", lambda: False)())
    except (ValueError, OSError):   # a closed stream
        return False


class Progress:
    """A progress bar with an estimate of the time left, drawn only on a terminal."""

    def __init__(self, total: float, stream: IO[str] | None | object = STDERR, desc: str | None = None,
                 unit: str = "step") -> None:
        stream = sys.stderr if stream is STDERR else stream
        self.total = max(1, total)
        self.done = 0
        self.enabled = stream is not None and _is_terminal(stream)
        self._pending = False
        # A terminal that reports no width (a pty nobody sized) would get an empty bar: 80 columns then.
        width = shutil.get_terminal_size((80, 24)).columns or 80
        self._bar = tqdm(total=self.total, file=stream, desc=desc, unit=unit, disable=not self.enabled,
                         ncols=width, mininterval=0.2, leave=True)

    def step(self, label: str) -> None:
        """Announce the step about to run (the one before it counts as done now)."""
        if self._pending:
            self._bar.update(1)
        self._pending = True
        self.done = min(self.done + 1, int(self.total))
        self._bar.set_postfix_str(label, refresh=True)

    def advance_to(self, value: float, label: str | None = None) -> None:
        """For runs of a known length: ``value`` of ``total`` done (e.g. seconds elapsed)."""
        value = min(float(value), float(self.total))
        if value > self._bar.n:
            self._bar.update(value - self._bar.n)
        if label is not None:
            self._bar.set_postfix_str(label, refresh=False)

    def write(self, text: str, stream: IO[str] | None | object = STDERR) -> None:
        """Print a line above the bar (a plain print would tear it): for commands that also log."""
        stream = sys.stderr if stream is STDERR else stream
        if stream is None:
            return
        if self.enabled:
            self._bar.write(text, file=stream)
        else:
            print(text, file=stream, flush=True)

    def tick(self, n: float = 1) -> None:
        """``n`` more units done (rounds, cases: the loops that count as they go)."""
        self._bar.update(n)

    def say(self, line: str, stream: IO[str] | None | object = None) -> None:
        """For a command that reports each step as a line of its output: print ``line`` there
        (``stream``, stdout by default; above the bar on a terminal) and count a step done."""
        self.write(line, sys.stdout if stream is None else stream)
        label = line.strip()
        self._bar.update(1)
        # Lines come seconds apart: each drawn at once (tqdm would wait out its mininterval).
        self._bar.set_postfix_str(label if len(label) <= STEP_LABEL_CHARS else label[:STEP_LABEL_CHARS - 3] + "...",
                                  refresh=True)

    def close(self) -> None:
        if self._pending:
            self._bar.update(1)
            self._pending = False
        self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ticking:
    """A bar over a run of known length in seconds, advanced by a thread of its own twice a second
    (``with ticking(30.0, "bench http-limits"): run()``); the run itself need not report anything."""

    def __init__(self, total_s: float, desc: str, stream: IO[str] | None | object = STDERR) -> None:
        import threading
        self.progress = Progress(total_s, stream, desc=desc, unit="s")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="progress", daemon=True)

    def _tick(self) -> None:
        import time
        started = time.monotonic()
        while not self._stop.wait(0.5):
            self.progress.advance_to(time.monotonic() - started)

    def __enter__(self) -> Progress:
        if self.progress.enabled:
            self._thread.start()
        return self.progress

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.progress.close()
