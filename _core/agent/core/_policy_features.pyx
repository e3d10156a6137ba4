# cython: language_level=3, embedsignature=True
"""The learned policy's feature vector in compiled code (agent.core._policy_features).

The specification is ``agent.learned.features.FeatureBuilder.fill`` (its pure twin, the same
names, order and units); this reads the compiled deadline queue through its C surface and writes
the preallocated float32 buffer directly. ``tests/test_learned_policy.py`` compares the two.
"""
from libc.math cimport exp

from agent.core._deadline_queue cimport DeadlineQueue


def fill_features(list lanes, list goodput, list batch_ms, object scheduler, double now, double clip,
                  double arrival_tau_s, double goodput_tau_s, float[::1] out):
    """Write the vector of ``lanes`` (the ``ModelLane`` objects in the card's order) at ``now``:
    ``goodput[k]`` the k-th lane's ``[rate, as of]``, ``batch_ms[k]`` its profile's bucket times."""
    cdef Py_ssize_t i = 0, k, n, free
    cdef double head, tight, wait, decay, at, rate
    cdef DeadlineQueue queue
    for k in range(len(lanes)):
        lane = lanes[k]
        queue = <DeadlineQueue?>lane.queue
        n = queue.size_c()
        out[i] = n
        if n:
            head = 1000.0 * (queue.head_deadline_c() - now)
            tight = 1000.0 * (queue.earliest_deadline_c() - now)
            wait = 1000.0 * (now - queue.oldest_arrival_c())
            out[i + 1] = clip if head > clip else (-clip if head < -clip else head)
            out[i + 2] = clip if tight > clip else (-clip if tight < -clip else tight)
            out[i + 3] = clip if wait > clip else wait
        else:
            out[i + 1] = clip
            out[i + 2] = clip
            out[i + 3] = 0.0
        i += 4
        at = lane.arrivals_at
        decay = exp((at - now) / arrival_tau_s) if now > at else 1.0
        for rate in lane.arrival_rates:
            out[i] = rate * decay
            i += 1
        free = len(lane.free_instances)
        out[i] = <Py_ssize_t>lane.instances - free
        out[i + 1] = free
        i += 2
        for rate in batch_ms[k]:
            out[i] = rate
            i += 1
        admission = lane.admission
        out[i] = admission.slowdown if admission is not None else 1.0
        entry = goodput[k]
        rate = entry[0]
        at = entry[1]
        out[i + 1] = rate * exp((at - now) / goodput_tau_s) if now > at else rate
        i += 2
    out[i] = <Py_ssize_t>scheduler.max_concurrent - <Py_ssize_t>scheduler.in_flight
    out[i + 1] = 1.0 if scheduler.urgent_waiting(now) else 0.0


def fill_mask(list lanes, tuple buckets, Py_ssize_t in_flight, Py_ssize_t max_concurrent, unsigned char[::1] mask):
    """The action mask of ``agent.learned.actions`` (idle, then per lane its buckets) into ``mask``;
    returns how many starts it allows (all but idle)."""
    cdef Py_ssize_t k, j, n, cap, previous, b, nb = len(buckets), starts = 0, base = 1
    cdef DeadlineQueue queue
    mask[:] = 0
    mask[0] = 1
    if in_flight >= max_concurrent:
        return 0
    for k in range(len(lanes)):
        lane = lanes[k]
        queue = <DeadlineQueue?>lane.queue
        n = queue.size_c()
        if n and lane.free_instances:
            cap = lane.rule.max_batch
            previous = 0
            for j in range(nb):
                if previous >= n or previous >= cap:
                    break
                mask[base + j] = 1
                starts += 1
                previous = buckets[j]
        base += nb
    return starts
