"""``edge-agent run`` under systemd (``Type=notify``): what the agent tells the service manager.

* while models load and are profiled: ``STATUS=loading ...``;
* ``READY=1`` once the models are loaded and the intakes listen, with a ``STATUS=`` that names the
  models and where they are served; a degraded start (the broker unreachable while HTTP serves)
  is still ready, and its status begins ``degraded:`` and says what is missing;
* every few seconds a ``STATUS=`` line with the load and the goodput since the last one;
* ``WATCHDOG=1`` only from the scheduler's own progress: the live loop's ``heartbeat``, which the
  workers advance as they come round the dispatch loop (``agent.runtime.live``). A ping is sent
  only if the heartbeat moved since the last one, so a stalled scheduler (its lock never released,
  every worker stuck in a backend) stops the pings although this thread still runs, and systemd
  restarts the agent after ``WatchdogSec``;
* ``STOPPING=1`` on SIGTERM, before the drain (``[agent] drain_timeout_s``).

Before the scheduler exists (models loading) there is no progress to show: the pings then come
from a thread that ends at ``READY=1``; a start that hangs is bounded by ``TimeoutStartSec``
instead (systemd fails a start that never says ``READY=1``).

The caller's loop calls :meth:`Supervisor.tick` a few times a second; nothing here blocks on the
scheduler's lock, so a stalled scheduler cannot stall the status lines.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Callable, Iterator, Mapping

from agent.ops.notify import Notifier, watchdog_interval

log = logging.getLogger(__name__)

__all__ = ["Supervisor", "ProgressWatchdog", "load_line"]

#: Seconds between ``STATUS=`` lines while serving.
STATUS_INTERVAL_S = 5.0


class ProgressWatchdog:
    """Sends ``WATCHDOG=1`` every ``interval_s``, but only when ``heartbeat()`` has moved since
    the last ping; otherwise withholds it (logged once per stall)."""

    def __init__(self, notifier: Notifier, interval_s: float, heartbeat: Callable[[], int],
                 now: float) -> None:
        self.notifier = notifier
        self.interval_s = interval_s
        self._heartbeat = heartbeat
        self._last_beat = heartbeat()
        self._due = now + interval_s
        self._last_ping = now
        self._stalled = False

    def tick(self, now: float) -> None:
        if now < self._due:
            return
        self._due = now + self.interval_s
        beat = self._heartbeat()
        if beat != self._last_beat:
            self._last_beat = beat
            self._last_ping = now
            if self._stalled:
                log.warning("the scheduler moves again: watchdog pings resumed")
                self._stalled = False
            self.notifier.send("WATCHDOG=1")
        elif not self._stalled:
            self._stalled = True
            log.error("the scheduler made no progress for %.1f s: watchdog pings withheld "
                      "(systemd restarts the agent once WatchdogSec passes without one)", now - self._last_ping)


def _totals(snapshot: Mapping[str, dict]) -> tuple[int, int, int]:
    """(accepted, ok, errors) summed over the models of a ``Telemetry.snapshot``."""
    accepted = sum(m["accepted"] for m in snapshot.values())
    ok = sum(m["ok"] for m in snapshot.values())
    errors = sum(sum(m["errors"].values()) for m in snapshot.values())
    return accepted, ok, errors


def load_line(before: Mapping[str, dict], after: Mapping[str, dict], seconds: float, queued: int,
              in_flight: int) -> str:
    """Load and goodput between two telemetry snapshots: requests accepted per second, replies
    ``ok`` per second (goodput: answered within the deadline; a late answer is an error), errors
    per second (refusals included), what is queued and how many batches run now."""
    (a0, ok0, e0), (a1, ok1, e1) = _totals(before), _totals(after)
    per_s = 1.0 / seconds if seconds > 0 else 0.0
    answered = (ok1 - ok0) + (e1 - e0)
    attained = f", {100.0 * (ok1 - ok0) / answered:.1f}% in SLO" if answered else ""
    return (f"load {(a1 - a0) * per_s:.1f} req/s, goodput {(ok1 - ok0) * per_s:.1f}/s, "
            f"errors {(e1 - e0) * per_s:.1f}/s{attained}; {queued} queued, {in_flight} batches running")


class Supervisor:
    """Drives the notifications of one ``edge-agent run``; all of it a no-op without
    ``$NOTIFY_SOCKET`` (``environ`` defaults to ``os.environ``)."""

    def __init__(self, environ: Mapping[str, str] | None = None, *, clock: Callable[[], float] = time.monotonic,
                 status_interval_s: float | None = None) -> None:
        self.notifier = Notifier(environ)
        self.watchdog_s = watchdog_interval(environ) if self.notifier.enabled else None
        self.clock = clock
        self.status_interval_s = STATUS_INTERVAL_S if status_interval_s is None else status_interval_s
        self._service = None
        self._serving = ""
        self._watchdog: ProgressWatchdog | None = None
        self._status_due = 0.0
        self._last_snapshot: dict = {}
        self._last_at = 0.0

    @contextlib.contextmanager
    def starting(self, what: str) -> Iterator[None]:
        """``STATUS=<what>`` and, with a watchdog, pings from a thread until the block ends (the
        scheduler does not run yet: module docstring)."""
        self.notifier.send(f"STATUS={what}")
        done = threading.Event()
        feeder = None
        if self.watchdog_s is not None:
            def feed() -> None:
                while not done.wait(self.watchdog_s):
                    self.notifier.send("WATCHDOG=1")
            feeder = threading.Thread(target=feed, name="edge-agent-startup-watchdog", daemon=True)
            feeder.start()
        try:
            yield
        finally:
            done.set()
            if feeder is not None:
                feeder.join()

    def ready(self, service, serving: str) -> str:
        """``READY=1`` with the status; returns that status line. ``serving``: what and where,
        e.g. ``serving a, b on mqtt://host:1883``."""
        self._service = service
        self._serving = serving
        now = self.clock()
        self._last_snapshot, self._last_at = service.agent.telemetry.snapshot(), now
        self._status_due = now + self.status_interval_s
        status = self._status_prefix() + serving
        lines = ["READY=1", f"STATUS={status}"]
        if self.watchdog_s is not None:
            loop = service.agent.loop
            self._watchdog = ProgressWatchdog(self.notifier, self.watchdog_s, lambda: loop.heartbeat, now)
            lines.append("WATCHDOG=1")
        self.notifier.send(*lines)
        return status

    def tick(self) -> None:
        """Called from the run loop: a ``STATUS=`` line when one is due, a watchdog ping when due
        and earned."""
        if self._service is None:
            return
        now = self.clock()
        if self._watchdog is not None:
            self._watchdog.tick(now)
        if now >= self._status_due:
            self._status_due = now + self.status_interval_s
            self.notifier.send(f"STATUS={self.status_line(now)}")

    def status_line(self, now: float) -> str:
        agent = self._service.agent
        snapshot = agent.telemetry.snapshot()
        # Read without the scheduler's lock (ints and queue lengths): a stalled scheduler must
        # not stall the status.
        line = load_line(self._last_snapshot, snapshot, now - self._last_at, agent.scheduler.queued(),
                         agent.scheduler.in_flight)
        self._last_snapshot, self._last_at = snapshot, now
        return f"{self._status_prefix()}{self._serving}: {line}"

    def _status_prefix(self) -> str:
        missing = self._service.missing() if self._service is not None else []
        return f"degraded: {'; '.join(missing)}; " if missing else ""

    def stopping(self, drain_s: float) -> None:
        """``STOPPING=1``: from here systemd waits for the exit (``TimeoutStopSec``)."""
        self._watchdog = None
        self.notifier.send("STOPPING=1", f"STATUS=stopping: serving what is queued for up to {drain_s:g} s, "
                                         "then answering the rest shutting_down")

    def close(self) -> None:
        self.notifier.close()
