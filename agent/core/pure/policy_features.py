"""The learned policy's feature vector: the specification of the compiled
``agent.core._policy_features`` (same signature, names, order and units).

What each feature means, and the schema it belongs to, is ``agent.learned.features``; this writes
the vector of ``lanes`` (``ModelLane`` objects, the card's order) into ``out`` from what the queue
and the scheduler keep, with no pass over the queued requests.
"""
from __future__ import annotations

import math

import numpy as np


def fill_features(lanes: list, goodput: list, batch_ms: list, scheduler, now: float, clip: float,
                  arrival_tau_s: float, goodput_tau_s: float, out: np.ndarray) -> None:
    exp = math.exp
    values: list[float] = []
    append, extend = values.append, values.extend
    for k, lane in enumerate(lanes):
        queue = lane.queue
        n = len(queue)
        if n:
            head = 1000.0 * (queue.head_deadline() - now)
            tight = 1000.0 * (queue.earliest_deadline() - now)
            wait = 1000.0 * (now - queue.oldest_arrival())
            extend((n, clip if head > clip else -clip if head < -clip else head,
                    clip if tight > clip else -clip if tight < -clip else tight,
                    clip if wait > clip else wait))
        else:
            extend((0.0, clip, clip, 0.0))
        decay = exp((lane.arrivals_at - now) / arrival_tau_s) if now > lane.arrivals_at else 1.0
        for rate in lane.arrival_rates:
            append(rate * decay)
        free = len(lane.free_instances)
        extend((lane.instances - free, free))
        extend(batch_ms[k])
        admission = lane.admission
        append(admission.slowdown if admission is not None else 1.0)
        rate, at = goodput[k]
        append(rate * exp((at - now) / goodput_tau_s) if now > at else rate)
    extend((scheduler.max_concurrent - scheduler.in_flight, 1.0 if scheduler.urgent_waiting(now) else 0.0))
    out[:] = values      # one numpy write costs about as much as the whole list


__all__ = ["fill_features", "fill_mask"]


def fill_mask(lanes: list, buckets: tuple, in_flight: int, max_concurrent: int, mask: np.ndarray) -> int:
    """The action mask of ``agent.learned.actions`` (idle, then per lane its buckets: a lane with a
    queued request and a free instance; a bucket not above ``rule.max_batch`` and, beyond the first,
    one whose next-smaller bucket is below the queue's length) into ``mask``; returns how many
    starts it allows (all but idle)."""
    mask[:] = 0
    mask[0] = 1
    if in_flight >= max_concurrent:
        return 0
    starts, base, nb = 0, 1, len(buckets)
    for lane in lanes:
        n = len(lane.queue)
        if n and lane.free_instances:
            cap = lane.rule.max_batch
            previous = 0
            for j, b in enumerate(buckets):
                if previous >= n or previous >= cap:
                    break
                mask[base + j] = 1
                starts += 1
                previous = b
        base += nb
    return starts
