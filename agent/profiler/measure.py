"""Measurement: how long a batch takes on this board, alone and next to other running instances.

Two kinds of figures, both taken with the model's real runtime on zero-filled inputs of the card's
shape (the demo models' cost does not depend on the pixel values):

* **batch sweep** (one instance, nothing else running): latency per batch size 1, 2, 4, ... with
  warm-up runs first, because the first runs of a session at a new shape pay for memory planning;
* **concurrency**: k instances of the model (k separate sessions, each on its own thread, as the
  agent runs them) busy at once, and pairs of *different* models busy at once. Only runs that
  started after every thread was going and finished before any thread was told to stop count, so
  every kept sample saw exactly k co-runners; a naive "start k threads, time N runs each" lets a
  fast thread finish alone and reports too little interference (on the 2-core development VM it
  showed more instances than cores as free: BENCHMARKS.md, "Figures that were in docstrings").

:func:`measure_latency_table` and :func:`profile_batch_sizes` are the quick start-up profile the
agent takes before serving (:mod:`agent.api`); they keep their signatures and behaviour.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from agent.backends.base import Backend, BackendError
from agent.core import LatencyTable
from agent.models.tensors import TensorSpec

__all__ = [
    "profile_batch_sizes",
    "measure_latency_table",
    "LatencyStats",
    "summarize",
    "zeros_batch",
    "BatchSweep",
    "measure_batch_sweep",
    "ConcurrentSamples",
    "run_concurrently",
]

#: Below this many samples a 99th percentile is not a measurement; the tail is the maximum instead.
P99_MIN_SAMPLES = 100


def profile_batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to and including ``max_batch``: the table interpolates between them."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


def measure_latency_table(backend: Backend, inputs: Sequence[TensorSpec], max_batch: int,
                          repeats: int = 5) -> LatencyTable:
    """Median run time per batch size on one instance, after one warm-up run per size."""
    sizes = profile_batch_sizes(max_batch)
    medians = [float(np.median(time_runs(backend, zeros_batch(inputs, b), repeats, warmup=1))) for b in sizes]
    # Measurement noise can make b+1 look faster than b; the table must not promise that.
    medians = np.maximum.accumulate(np.array(medians))
    return LatencyTable(np.array(sizes, dtype=np.int64), medians)


@dataclass(frozen=True)
class LatencyStats:
    """Summary of one set of samples, in milliseconds.

    ``tail`` says what ``p99_ms`` holds: ``"p99"`` when there were at least
    :data:`P99_MIN_SAMPLES` samples, else ``"max"`` (a p99 of 20 samples is an interpolation
    between the two largest, which promises more than was measured).
    """

    p50_ms: float
    p99_ms: float
    mean_ms: float
    samples: int
    tail: str


def summarize(samples_s: Sequence[float]) -> LatencyStats:
    """p50 / p99-or-max / mean in ms of run times given in seconds."""
    ms = np.asarray(samples_s, dtype=np.float64) * 1e3
    if ms.size == 0:
        raise ValueError("no samples to summarize")
    if ms.size >= P99_MIN_SAMPLES:
        tail, tail_value = "p99", float(np.percentile(ms, 99))
    else:
        tail, tail_value = "max", float(ms.max())
    return LatencyStats(float(np.median(ms)), tail_value, float(ms.mean()), int(ms.size), tail)


def measure_stage_times(stages: Sequence[Backend], stage_inputs: Sequence[TensorSpec], max_batch: int,
                        repeats: int = 5) -> tuple[list[int], list[list[float]]]:
    """A multi-exit model's stage sessions (one instance's, in order; ``stage_inputs`` each one's
    input) timed alone per batch size, on zero inputs: ``(batch sizes, [seconds per size] per stage)``,
    medians after one warm-up run. What admission prices an early exit by on this board
    (``agent.scheduler.exit_rule.ExitPlan``): the stage times the card carries were measured where the
    model was built."""
    sizes = profile_batch_sizes(max_batch)
    times = [[float(np.median(time_runs(stage, zeros_batch((spec,), b), repeats, warmup=1))) for b in sizes]
             for stage, spec in zip(stages, stage_inputs)]
    return sizes, times


def zeros_batch(inputs: Sequence[TensorSpec], batch_size: int) -> dict[str, np.ndarray]:
    """A batch of ``batch_size`` zero items for every input of the card."""
    return {spec.name: np.zeros((batch_size, *spec.item_shape()), dtype=spec.dtype) for spec in inputs}


def time_runs(backend: Backend, batch: dict[str, np.ndarray], repeats: int, warmup: int) -> list[float]:
    """Seconds of each of ``repeats`` runs of ``batch``, after ``warmup`` untimed runs."""
    for _ in range(warmup):
        backend.run(batch)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        backend.run(batch)
        samples.append(time.perf_counter() - t0)
    return samples


@dataclass(frozen=True)
class BatchSweep:
    """Latency per batch size of one instance running alone.

    ``stopped`` is None when every requested size ran, else why the sweep ended early (the batch
    size that failed and the error, e.g. out of memory); ``sizes`` then holds the sizes that ran.
    """

    sizes: list[int]
    stats: list[LatencyStats]
    stopped: str | None
    samples_s: list[list[float]] = field(default_factory=list)


def measure_batch_sweep(backend: Backend, inputs: Sequence[TensorSpec], sizes: Sequence[int], *,
                        repeats: int, warmup: int = 2,
                        on_step: Callable[[int], None] | None = None) -> BatchSweep:
    """Time ``repeats`` runs per batch size after ``warmup`` runs, smallest size first.

    A size that fails (the runtime cannot allocate it, or Python runs out of memory building the
    inputs) ends the sweep: every larger size would fail too, and a board profile that stops at
    the largest batch that fits is still a profile. ``on_step(b)`` is called before each size.
    """
    if repeats < 1:
        raise ValueError(f"repeats = {repeats}: expected an integer >= 1")
    done_sizes: list[int] = []
    stats: list[LatencyStats] = []
    all_samples: list[list[float]] = []
    for b in sizes:
        if on_step is not None:
            on_step(b)
        try:
            samples = time_runs(backend, zeros_batch(inputs, b), repeats, warmup)
        except (BackendError, MemoryError) as exc:
            return BatchSweep(done_sizes, stats, f"batch {b} failed: {exc}", all_samples)
        done_sizes.append(int(b))
        stats.append(summarize(samples))
        all_samples.append(samples)
    return BatchSweep(done_sizes, stats, None, all_samples)


@dataclass(frozen=True)
class ConcurrentSamples:
    """What :func:`run_concurrently` saw, per job (thread).

    ``durations_s[i]``: how long each kept run of job i took, start to end. ``cycle_s[i]``: wall
    time per completed run of job i over the window (first kept start to last kept end, divided
    by the runs): the duration *plus* the time the thread waited for a core between runs. The two
    differ when a run is shorter than the OS time slice: then k threads on too few cores take
    turns run by run, each run's duration stays as if alone, and the slowdown shows only in the
    cycle (mobilenet at batch 1 on the 2-core development VM: BENCHMARKS.md, "Figures that were in
    docstrings").
    """

    durations_s: list[list[float]]
    cycle_s: list[float]

    def balanced(self) -> list[float]:
        """All durations pooled, the same number from every job (the first ones of each), so a
        thread that got more runs in does not outvote a starved one."""
        n = min(len(d) for d in self.durations_s)
        return [x for d in self.durations_s for x in d[:n]]


def run_concurrently(jobs: Sequence[tuple[Backend, dict[str, np.ndarray]]], *, repeats: int,
                     min_window_s: float = 0.0, warmup: int = 1) -> ConcurrentSamples:
    """Run every ``(backend, batch)`` job on its own thread at once; run times per job.

    Each thread warms up, waits at a barrier, then runs its job back to back until every thread
    has completed ``repeats`` runs and at least ``min_window_s`` has passed. A sample is kept only
    if it started after the last thread left the barrier and ended before the stop signal, so
    all jobs were running during all of it: the figures are latencies *under* k-way load, not a
    mix of loaded and unloaded runs. Every job gets at least ``repeats`` kept samples.

    Threads are enough because the runtimes release the GIL while they compute
    (:mod:`agent.backends.base`). A job that raises makes this raise after all threads stopped.
    """
    if repeats < 1:
        raise ValueError(f"repeats = {repeats}: expected an integer >= 1")
    n = len(jobs)
    barrier = threading.Barrier(n)
    go_times = [0.0] * n
    records: list[list[tuple[float, float]]] = [[] for _ in range(n)]
    counted = [0] * n
    lock = threading.Lock()
    stop = threading.Event()
    stop_time = [float("inf")]
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        backend, batch = jobs[i]
        try:
            for _ in range(warmup):
                backend.run(batch)
        except BaseException as exc:  # noqa: BLE001 - reported to the caller below
            errors.append(exc)
            barrier.abort()
            return
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return
        go_times[i] = time.perf_counter()
        try:
            while not stop.is_set():
                t0 = time.perf_counter()
                backend.run(batch)
                t1 = time.perf_counter()
                records[i].append((t0, t1))
                with lock:
                    if stop.is_set():
                        break
                    # Count only runs that began once every thread was going: those are kept.
                    if all(go_times) and t0 >= max(go_times):
                        counted[i] += 1
                    if min(counted) >= repeats and t1 >= max(go_times) + min_window_s:
                        stop_time[0] = t1
                        stop.set()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=worker, args=(i,), name=f"profile-job-{i}", daemon=True)
               for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    start = max(go_times)
    kept = [[(t0, t1) for t0, t1 in rec if t0 >= start and t1 <= stop_time[0]] for rec in records]
    return ConcurrentSamples(
        durations_s=[[t1 - t0 for t0, t1 in runs] for runs in kept],
        cycle_s=[(runs[-1][1] - runs[0][0]) / len(runs) for runs in kept],
    )
