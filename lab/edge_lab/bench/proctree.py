"""CPU time and memory of a server's whole process tree, read from ``/proc`` while a benchmark runs.

Why a tree: Triton runs one python-backend stub process per model instance beside ``tritonserver``,
and edge-agent over MQTT needs its broker; a figure for the main process alone would flatter the
multi-process servers. A :class:`TreeMeter` follows every descendant of its root pids, so children
started or reaped during the run are counted (a reaped child's time is in its parent's ``cutime``).

Figures: CPU seconds (user + system) spent by the tree between :meth:`TreeMeter.start` and
:meth:`TreeMeter.stop`, and the peak over samples of the tree's summed RSS and summed PSS. RSS is
what the issue asks for and what ``ps`` shows; it counts a library shared by several processes
once per process, so PSS (each shared page split between its sharers) is reported beside it as the
fairer figure for multi-process servers. Linux only.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Iterable

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (which may hold spaces), or None if
    the process is gone. Index 1 is the ppid; 11..14 are utime, stime, cutime, cstime in ticks."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rfind(b")") + 2:].decode().split()


def descendants(roots: Iterable[int]) -> set[int]:
    """``roots`` and every living process below them."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat_fields(int(name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(name))
    found: set[int] = set()
    todo = [pid for pid in roots if os.path.exists(f"/proc/{pid}")]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def tree_cpu_s(roots: Iterable[int]) -> float:
    """CPU seconds used so far by the trees under ``roots``: each living process's own time plus
    what its reaped children used (``cutime``/``cstime``)."""
    ticks = 0
    for pid in descendants(roots):
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += sum(int(v) for v in fields[11:15])
    return ticks * _TICK_S


def _rss_pss_bytes(pid: int) -> tuple[int, int]:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            rss = pss = 0
            for line in f:
                if line.startswith(b"Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith(b"Pss:"):
                    pss = int(line.split()[1]) * 1024
            return rss, pss
    except OSError:
        return 0, 0


def tree_memory_bytes(roots: Iterable[int]) -> tuple[int, int]:
    """Summed RSS and summed PSS of the trees under ``roots`` now."""
    rss = pss = 0
    for pid in descendants(roots):
        r, p = _rss_pss_bytes(pid)
        rss += r
        pss += p
    return rss, pss


def thread_ticks(roots: Iterable[int]) -> dict[tuple[int, int], tuple[int, str]]:
    """Every living thread of the trees under ``roots``: (pid, tid) -> (its user + system ticks so
    far, its process's name)."""
    found = {}
    for pid in descendants(roots):
        try:
            with open(f"/proc/{pid}/comm") as f:
                name = f.read().strip()
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                    text = f.read()
            except OSError:
                continue
            fields = text[text.rfind(b")") + 2:].split()
            found[(pid, int(tid))] = (int(fields[11]) + int(fields[12]), name)
    return found


@dataclass(frozen=True)
class TreeUsage:
    cpu_s: float                # user + system seconds of the tree during the window
    wall_s: float
    peak_rss_bytes: int         # the largest summed RSS seen
    peak_pss_bytes: int         # the largest summed PSS seen
    processes: int              # the most processes seen in the tree at once
    # CPU seconds of each root's own tree over the window (which part of a server took the time:
    # the agent or its broker)
    root_cpu_s: dict[int, float] | None = None
    # the busiest threads over the window: (process name, pid, tid, mean cores, busiest ~1 s in
    # cores), busiest first: a single thread near one core is a serial limit
    busiest_threads: tuple = ()

    def as_dict(self) -> dict:
        return {"cpu_s": round(self.cpu_s, 3), "wall_s": round(self.wall_s, 3),
                "peak_rss_mb": round(self.peak_rss_bytes / 2**20, 1),
                "peak_pss_mb": round(self.peak_pss_bytes / 2**20, 1), "processes": self.processes,
                "root_cpu_s": {str(pid): round(cpu, 3) for pid, cpu in (self.root_cpu_s or {}).items()},
                "busiest_threads": [{"process": name, "pid": pid, "tid": tid, "cores": round(mean, 3),
                                     "peak_cores": round(peak, 3)}
                                    for name, pid, tid, mean, peak in self.busiest_threads]}


class TreeMeter:
    """Samples a process tree's memory on a thread every ``interval_s`` from :meth:`start` to
    :meth:`stop`, and takes its CPU time at both ends."""

    #: Threads' CPU is compared over windows of this many samples (about 1 s at the default interval).
    THREAD_WINDOW = 5

    def __init__(self, roots: Iterable[int], interval_s: float = 0.2) -> None:
        self.roots = list(roots)
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak_rss = self._peak_pss = self._processes = 0
        self._cpu0 = 0.0
        self._root_cpu0: dict[int, float] = {}
        self._t0 = 0.0
        self._samples = 0
        self._threads0: dict = {}
        self._window: tuple[float, dict] = (0.0, {})
        self._thread_peak: dict[tuple[int, int], float] = {}

    def _sample(self) -> None:
        pids = descendants(self.roots)
        self._processes = max(self._processes, len(pids))
        rss, pss = tree_memory_bytes(self.roots)
        self._peak_rss = max(self._peak_rss, rss)
        self._peak_pss = max(self._peak_pss, pss)
        self._samples += 1
        if self._samples % self.THREAD_WINDOW == 0:
            self._thread_window()

    def _thread_window(self) -> None:
        now, ticks = time.perf_counter(), thread_ticks(self.roots)
        then, before = self._window
        if before and now > then:
            for key, (count, _) in ticks.items():
                if key in before:
                    share = (count - before[key][0]) * _TICK_S / (now - then)
                    self._thread_peak[key] = max(self._thread_peak.get(key, 0.0), share)
        self._window = (now, ticks)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def start(self) -> "TreeMeter":
        self._sample()
        self._cpu0 = tree_cpu_s(self.roots)
        self._root_cpu0 = {pid: tree_cpu_s([pid]) for pid in self.roots}
        self._threads0 = thread_ticks(self.roots)
        self._t0 = time.perf_counter()
        self._window = (self._t0, self._threads0)
        self._thread = threading.Thread(target=self._run, name="tree-meter", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> TreeUsage:
        cpu = tree_cpu_s(self.roots) - self._cpu0
        roots = {pid: tree_cpu_s([pid]) - self._root_cpu0.get(pid, 0.0) for pid in self.roots}
        threads = thread_ticks(self.roots)
        wall = time.perf_counter() - self._t0
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        busiest = sorted(((name, pid, tid, (count - self._threads0.get((pid, tid), (0,))[0]) * _TICK_S / wall,
                           self._thread_peak.get((pid, tid), 0.0))
                          for (pid, tid), (count, name) in threads.items()), key=lambda t: -t[3])[:4]
        return TreeUsage(cpu, wall, self._peak_rss, self._peak_pss, self._processes, roots, tuple(busiest))


__all__ = ["TreeMeter", "TreeUsage", "descendants", "thread_ticks", "tree_cpu_s", "tree_memory_bytes"]
