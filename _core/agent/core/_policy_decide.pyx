# cython: language_level=3, embedsignature=True
"""The learned policy's whole decision in one compiled call (agent.core._policy_decide).

The specification is ``agent.core.pure.policy_decide.PolicyDecider``: the mask
(``fill_mask``), then, when it allows a start, the feature vector (``fill_features``) and the
network's masked argmax (``PolicyNet``), written into the same preallocated buffers, with no
Python between them. What it reads of the lanes is bound once: the queue, the instance list, the
arrival rates, the rule and the admission control of each lane are the objects a ``ModelLane``
keeps for its whole life under one policy (the scheduler builds its policy again when a lane's
rule or admission changes, ``Scheduler._lanes_changed``); the numbers that move (the rule's
``max_batch``, the arrival time, the slowdown, the slots in flight, the tightest SLO) are read at
each decision. ``tests/test_learned_policy.py`` compares the two twins along a simulated run.
"""
cimport cython
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.ref cimport PyObject
from libc.math cimport exp, INFINITY
from libc.stdlib cimport malloc, free

from agent.core._deadline_queue cimport DeadlineQueue
from agent.core._policy_net cimport PolicyNet


cdef inline double _as_double(object value):
    return PyFloat_AS_DOUBLE(value) if type(value) is float else <double>value


@cython.final
cdef class PolicyDecider:
    cdef list lanes, queues, free_lists, rates, rules, admissions, goodput, capped_seen
    cdef PolicyNet net
    cdef float[::1] features
    cdef unsigned char[::1] mask
    cdef double* batch_ms
    cdef Py_ssize_t* buckets
    cdef bint* capped
    cdef Py_ssize_t n_lanes, nb, n_features
    cdef double clip, arrival_tau_s, goodput_tau_s
    cdef object capped_list
    cdef readonly Py_ssize_t starts

    def __init__(self, list lanes, list goodput, list batch_ms, tuple buckets, PolicyNet net,
                 float[::1] features, unsigned char[::1] mask, double clip, double arrival_tau_s,
                 double goodput_tau_s):
        """``lanes``: the ``ModelLane`` objects in the card's order; ``goodput[k]`` the k-th lane's
        ``[rate, as of]`` (kept by the caller, read at each decision); ``batch_ms[k]`` its
        profile's time per bucket; ``features`` and ``mask`` the buffers the decision writes."""
        cdef Py_ssize_t k, j
        self.n_lanes, self.nb = len(lanes), len(buckets)
        if len(goodput) != self.n_lanes or len(batch_ms) != self.n_lanes:
            raise ValueError(f"PolicyDecider: {self.n_lanes} lanes, {len(goodput)} goodput entries and "
                             f"{len(batch_ms)} profiles: expected one each")
        n_rates = len(lanes[0].arrival_rates) if self.n_lanes else 0
        self.n_features = self.n_lanes * (4 + n_rates + 2 + self.nb + 2) + 2
        if features.shape[0] != self.n_features or features.shape[0] != net.n_in:
            raise ValueError(f"PolicyDecider: {features.shape[0]} features, the network takes {net.n_in}: "
                             f"expected {self.n_features}")
        if mask.shape[0] != 1 + self.n_lanes * self.nb or mask.shape[0] != net.n_out:
            raise ValueError(f"PolicyDecider: {mask.shape[0]} mask entries, the network gives {net.n_out}: "
                             f"expected {1 + self.n_lanes * self.nb}")
        self.lanes, self.goodput, self.net = list(lanes), list(goodput), net
        self.features, self.mask = features, mask
        self.queues = [<DeadlineQueue?>lane.queue for lane in lanes]
        self.free_lists = [lane.free_instances for lane in lanes]
        self.rates = [lane.arrival_rates for lane in lanes]
        self.rules = [lane.rule for lane in lanes]
        self.admissions = [lane.admission for lane in lanes]
        for k in range(self.n_lanes):
            if type(self.free_lists[k]) is not list or type(self.rates[k]) is not list:
                raise TypeError("PolicyDecider: a lane's free_instances and arrival_rates must be lists")
            if len(self.rates[k]) != n_rates or len(batch_ms[k]) != self.nb:
                raise ValueError("PolicyDecider: the lanes' arrival bands or profiles differ in length")
            if type(goodput[k]) is not list or len(goodput[k]) != 2:
                raise TypeError("PolicyDecider: each goodput entry must be a [rate, as of] list")
        self.batch_ms = <double*>malloc(max(1, self.n_lanes * self.nb) * sizeof(double))
        self.buckets = <Py_ssize_t*>malloc(max(1, self.nb) * sizeof(Py_ssize_t))
        self.capped = <bint*>malloc(max(1, self.n_lanes) * sizeof(bint))
        if not self.batch_ms or not self.buckets or not self.capped:
            raise MemoryError()
        for j in range(self.nb):
            self.buckets[j] = buckets[j]
        for k in range(self.n_lanes):
            for j in range(self.nb):
                self.batch_ms[k * self.nb + j] = batch_ms[k][j]
            self.capped[k] = False
        self.clip, self.arrival_tau_s, self.goodput_tau_s = clip, arrival_tau_s, goodput_tau_s
        self.capped_list = None
        self.starts = 0

    def __dealloc__(self):
        free(self.batch_ms)
        free(self.buckets)
        free(self.capped)

    cdef void _index_capped(self, object capped_list):
        """Which of our lanes the scheduler's hold cap covers (``Scheduler._capped``)."""
        cdef Py_ssize_t k
        for k in range(self.n_lanes):
            self.capped[k] = False
            for lane in capped_list:
                if lane is self.lanes[k]:
                    self.capped[k] = True
        self.capped_list = capped_list

    def decide(self, object scheduler, double now):
        """The chosen action index (0 = idle) at ``now``, or -1 when the mask allows no start
        (then the features and the network are not computed); :attr:`starts` the starts allowed."""
        cdef Py_ssize_t k, j, i, n, cap, previous, free_n, starts = 0, base = 1, nb = self.nb
        cdef Py_ssize_t in_flight = scheduler.in_flight, max_concurrent = scheduler.max_concurrent
        cdef unsigned char* mask = &self.mask[0]
        cdef float* out = &self.features[0]
        cdef double head, tight, wait, decay, at, rate, clip = self.clip, horizon
        cdef DeadlineQueue queue
        cdef bint urgent
        cdef list values, entry
        for j in range(1 + self.n_lanes * nb):
            mask[j] = 0
        mask[0] = 1
        if in_flight < max_concurrent:
            for k in range(self.n_lanes):
                queue = <DeadlineQueue>PyList_GET_ITEM(self.queues, k)
                n = queue.size_c()
                if n and PyList_GET_SIZE(<list>PyList_GET_ITEM(self.free_lists, k)):
                    cap = (<object>PyList_GET_ITEM(self.rules, k)).max_batch
                    previous = 0
                    for j in range(nb):
                        if previous >= n or previous >= cap:
                            break
                        mask[base + j] = 1
                        starts += 1
                        previous = self.buckets[j]
                base += nb
        self.starts = starts
        if not starts:
            return -1
        capped_list = scheduler._capped
        if capped_list is not self.capped_list:
            self._index_capped(capped_list)
        horizon = now + _as_double(scheduler.tight_slo_s)
        urgent = False
        i = 0
        for k in range(self.n_lanes):
            queue = <DeadlineQueue>PyList_GET_ITEM(self.queues, k)
            n = queue.size_c()
            out[i] = n
            if n:
                head = 1000.0 * (queue.head_deadline_c() - now)
                tight = queue.earliest_deadline_c()
                if self.capped[k] and tight <= horizon:
                    urgent = True
                tight = 1000.0 * (tight - now)
                wait = 1000.0 * (now - queue.oldest_arrival_c())
                out[i + 1] = clip if head > clip else (-clip if head < -clip else head)
                out[i + 2] = clip if tight > clip else (-clip if tight < -clip else tight)
                out[i + 3] = clip if wait > clip else wait
            else:
                out[i + 1] = clip
                out[i + 2] = clip
                out[i + 3] = 0.0
            i += 4
            lane = <object>PyList_GET_ITEM(self.lanes, k)
            at = _as_double(lane.arrivals_at)
            decay = exp((at - now) / self.arrival_tau_s) if now > at else 1.0
            values = <list>PyList_GET_ITEM(self.rates, k)
            for j in range(PyList_GET_SIZE(values)):
                out[i] = _as_double(<object>PyList_GET_ITEM(values, j)) * decay
                i += 1
            free_n = PyList_GET_SIZE(<list>PyList_GET_ITEM(self.free_lists, k))
            out[i] = <Py_ssize_t>lane.instances - free_n
            out[i + 1] = free_n
            i += 2
            for j in range(nb):
                out[i] = self.batch_ms[k * nb + j]
                i += 1
            admission = <object>PyList_GET_ITEM(self.admissions, k)
            out[i] = _as_double(admission.slowdown) if admission is not None else 1.0
            entry = <list>PyList_GET_ITEM(self.goodput, k)
            rate = _as_double(<object>PyList_GET_ITEM(entry, 0))
            at = _as_double(<object>PyList_GET_ITEM(entry, 1))
            out[i + 1] = rate * exp((at - now) / self.goodput_tau_s) if now > at else rate
            i += 2
        out[i] = max_concurrent - in_flight
        out[i + 1] = 1.0 if urgent else 0.0
        return self.net.act_c(out, mask)
