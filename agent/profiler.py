"""A quick on-device profile taken at start: each model's batch latency on this board.

The deadline-aware batching rule and (next issue) admission control need to know how long a batch
of b takes here, on this backend; a board's speed cannot be assumed (on a 2-core CPU batching saves
almost nothing per item, on a GPU it saves 64x). This measures it with the model's own instances
before the agent takes traffic, which also warms them up. The full profiler (concurrency,
interference, a versioned profile file) builds on this.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from agent.backends.base import Backend, TensorSpec
from agent.core import LatencyTable


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
    medians = []
    for b in sizes:
        batch = {spec.name: np.zeros((b, *spec.item_shape()), dtype=spec.dtype) for spec in inputs}
        backend.run(batch)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            backend.run(batch)
            times.append(time.perf_counter() - t0)
        medians.append(float(np.median(times)))
    # Measurement noise can make b+1 look faster than b; the table must not promise that.
    medians = np.maximum.accumulate(np.array(medians))
    return LatencyTable(np.array(sizes, dtype=np.int64), medians)
