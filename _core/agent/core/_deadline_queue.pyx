# cython: language_level=3, embedsignature=True
"""Earliest-deadline-first queue of request ids, in C structs (compiled as agent.core._deadline_queue).

The readable specification is ``agent.core.pure.DeadlineQueue``; this is the same behaviour with
no Python object per queued request:

* a binary heap of 24-byte nodes holding the ordering key inline (priority, key, seq) and a
  slot number; the key is the deadline unless the caller gives another (the scheduler's EDF
  horizon), and the deadline, which expiry goes by, lives in the slot;
* per-slot arrays (id, arrival, deadline, heap position) and a free-slot stack, all allocated once
  at construction for ``capacity`` entries;
* an open-addressing hash table id -> slot (linear probing, Fibonacci hashing, backward-shift
  deletion, load factor <= 1/2), so ``cancel`` and ``__contains__`` are O(1) + O(log n);
* cached minima of deadline and arrival, rescanned (a C loop) only after the entry holding the
  minimum leaves, so ``earliest_deadline`` and ``oldest_arrival`` are O(1) in the common case.

The Python entry points keep the GIL: releasing and re-taking it would cost more than a whole
call does (BENCHMARKS.md, "Deadline queue") and could hand the interpreter to another thread
for a whole switch interval. The C-level methods are ``nogil`` so compiled callers may use them
without it.
"""
cimport cython
from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.stdlib cimport malloc, free, qsort
from libc.math cimport INFINITY
from cpython.number cimport PyIndex_Check
from cpython.buffer cimport (
    PyObject_GetBuffer,
    PyBuffer_Release,
    PyBUF_FORMAT,
    PyBUF_ND,
    PyBUF_WRITABLE,
)

from agent.core.types import PushResult, _check_capacity

# The returned enum members, held in C variables: no module-dict lookup per push.
cdef object _RESULT_OK = PushResult.OK
cdef object _RESULT_FULL = PushResult.FULL
cdef object _RESULT_DUPLICATE = PushResult.DUPLICATE
cdef tuple _RESULTS = (_RESULT_OK, _RESULT_FULL, _RESULT_DUPLICATE)

# drop_expired removes this many entries one by one (O(k log n)); more, it filters the heap
# and re-heapifies (O(n)).
cdef Py_ssize_t _DROP_ONE_BY_ONE = 8


cdef inline bint _before(const QueueNode* a, const QueueNode* b) noexcept nogil:
    """Pop order: higher priority first, then earlier key, then earlier insertion."""
    if a.priority != b.priority:
        return a.priority > b.priority
    if a.key != b.key:
        return a.key < b.key
    return a.seq < b.seq


cdef inline void _sift_up(QueueNode* heap, int32_t* slot_pos, Py_ssize_t pos,
                          QueueNode node) noexcept nogil:
    """Move ``node`` from ``pos`` towards the root to its place; keep ``slot_pos`` in step."""
    cdef Py_ssize_t parent
    while pos > 0:
        parent = (pos - 1) >> 1
        if not _before(&node, &heap[parent]):
            break
        heap[pos] = heap[parent]
        slot_pos[heap[pos].slot] = <int32_t>pos
        pos = parent
    heap[pos] = node
    slot_pos[node.slot] = <int32_t>pos


cdef inline void _sift_down(QueueNode* heap, int32_t* slot_pos, Py_ssize_t n, Py_ssize_t pos,
                            QueueNode node) noexcept nogil:
    """Move ``node`` from ``pos`` towards the leaves of the ``n``-node heap to its place."""
    cdef Py_ssize_t child
    while True:
        child = 2 * pos + 1
        if child >= n:
            break
        if child + 1 < n and _before(&heap[child + 1], &heap[child]):
            child += 1
        if not _before(&heap[child], &node):
            break
        heap[pos] = heap[child]
        slot_pos[heap[pos].slot] = <int32_t>pos
        pos = child
    heap[pos] = node
    slot_pos[node.slot] = <int32_t>pos


cdef int _compare_nodes(const void* a, const void* b) noexcept nogil:
    if _before(<const QueueNode*>a, <const QueueNode*>b):
        return -1
    if _before(<const QueueNode*>b, <const QueueNode*>a):
        return 1
    return 0


cdef inline Py_ssize_t _home_bucket(int64_t rid, int shift) noexcept nogil:
    # Fibonacci hashing: spreads sequential ids (the usual case) over the whole table.
    return <Py_ssize_t>((<uint64_t>rid * 0x9E3779B97F4A7C15ULL) >> shift)


cdef inline bint _is_int64_format(const char* fmt) noexcept:
    """PEP 3118 format of a native signed 64-bit integer: 'l' (LP64) or 'q', maybe prefixed
    with '@' or '=' (numpy writes plain 'l' for int64 on Linux)."""
    if fmt == NULL:
        return False
    if fmt[0] == b'@' or fmt[0] == b'=':
        fmt += 1
    return (fmt[0] == b'l' or fmt[0] == b'q') and fmt[1] == 0


cdef int _acquire_ids(object array, Py_buffer* view, str name) except -1:
    """Take the caller's id buffer (writable, 1-D, C-contiguous, int64), or raise an error
    that names the argument.

    The raw buffer protocol rather than a typed memoryview: a memoryview allocates an object
    and parses the format string on every call, which cost more than popping a whole batch.
    """
    try:
        PyObject_GetBuffer(array, view, PyBUF_WRITABLE | PyBUF_FORMAT | PyBUF_ND)
    except TypeError:
        raise TypeError(
            f"{name} must be a writable 1-D C-contiguous int64 numpy array, "
            f"got {type(array).__name__}") from None
    except (ValueError, BufferError) as exc:
        raise ValueError(
            f"{name} must be a writable 1-D C-contiguous int64 numpy array: {exc}") from None
    if view.ndim != 1 or view.itemsize != 8 or not _is_int64_format(view.format):
        message = (f"{name} must be a writable 1-D C-contiguous int64 numpy array: "
                   f"got dtype {getattr(array, 'dtype', None)}, ndim {view.ndim}")
        PyBuffer_Release(view)
        raise ValueError(message)
    return 0


cdef class DeadlineQueue:
    """Earliest-deadline-first queue of request ids for one model.

    Holds only ids and their timing (no payloads, no Python objects). Pop order: higher
    ``priority`` first, then earlier ``key`` (the deadline unless ``push`` was given another),
    then earlier insertion; expiry goes by the deadline. Times are seconds on the caller's clock.
    See ``agent.core.pure.DeadlineQueue`` for the full specification.
    """

    def __cinit__(self, capacity):
        cdef Py_ssize_t cap = _check_capacity(capacity)
        cdef Py_ssize_t buckets = 8
        cdef int bits = 3
        cdef Py_ssize_t i
        while buckets < 2 * cap:
            buckets <<= 1
            bits += 1
        self._capacity = cap
        self._heap = <QueueNode*>malloc(cap * sizeof(QueueNode))
        self._scratch = <QueueNode*>malloc(cap * sizeof(QueueNode))
        self._slot_id = <int64_t*>malloc(cap * sizeof(int64_t))
        self._slot_arrival = <double*>malloc(cap * sizeof(double))
        self._slot_deadline = <double*>malloc(cap * sizeof(double))
        self._slot_pos = <int32_t*>malloc(cap * sizeof(int32_t))
        self._free_slots = <int32_t*>malloc(cap * sizeof(int32_t))
        self._index = <int32_t*>malloc(buckets * sizeof(int32_t))
        if (self._heap == NULL or self._scratch == NULL or self._slot_id == NULL
                or self._slot_arrival == NULL or self._slot_deadline == NULL or self._slot_pos == NULL
                or self._free_slots == NULL or self._index == NULL):
            raise MemoryError(f"cannot allocate a DeadlineQueue of capacity {cap}")
        for i in range(buckets):
            self._index[i] = -1
        # Free slots as a stack, lowest slot on top.
        for i in range(cap):
            self._free_slots[i] = <int32_t>(cap - 1 - i)
            self._slot_pos[i] = -1
        self._n_free = cap
        self._index_mask = <uint64_t>(buckets - 1)
        self._index_shift = 64 - bits
        self._size = 0
        self._next_seq = 0
        self._min_deadline = INFINITY
        self._min_arrival = INFINITY
        self._min_deadline_ok = True
        self._min_arrival_ok = True

    def __dealloc__(self):
        free(self._heap)
        free(self._scratch)
        free(self._slot_id)
        free(self._slot_arrival)
        free(self._slot_deadline)
        free(self._slot_pos)
        free(self._free_slots)
        free(self._index)

    # ------------------------------------------------------------------------------------
    # Python surface
    # ------------------------------------------------------------------------------------

    # binding=False: a plain C method descriptor, cheaper per call than a cyfunction (BENCHMARKS.md,
    # "Figures that were in docstrings").
    @cython.binding(False)
    def push(self, int64_t rid, double deadline, double arrival, int32_t priority=0, key=None):
        """Queue request ``rid`` -> PushResult, ordered by ``key`` (default: ``deadline``), expiring
        at ``deadline``. DUPLICATE is checked before FULL; neither changes the queue. NaN
        deadline, arrival or key is a ValueError (it would break the order)."""
        cdef double order = deadline if key is None else key
        if deadline != deadline:
            raise ValueError(f"deadline must be a number, got nan (request {rid})")
        if arrival != arrival:
            raise ValueError(f"arrival must be a number, got nan (request {rid})")
        if order != order:
            raise ValueError(f"key must be a number, got nan (request {rid})")
        return _RESULTS[self.push_c(rid, deadline, arrival, priority, order)]

    @cython.binding(False)
    def pop_batch(self, Py_ssize_t max_n, double now, ready_out, expired_out):
        """Pop in key order into the caller's int64 arrays -> ``(n_ready, n_expired)``.

        Entries with ``deadline < now`` go to ``expired_out``, others to ``ready_out``. Stops
        when ``min(max_n, len(ready_out))`` ready ids were taken, the queue is empty, or an
        expired entry is at the top and ``expired_out`` is full (it then stays queued: no id is
        ever lost). Ids are written in pop order.
        """
        cdef Py_buffer ready, expired
        cdef Py_ssize_t n_ready = 0, n_expired = 0
        if max_n < 0:
            raise ValueError(f"max_n must be >= 0, got {max_n}")
        _acquire_ids(ready_out, &ready, "ready_out")
        try:
            _acquire_ids(expired_out, &expired, "expired_out")
        except BaseException:
            PyBuffer_Release(&ready)
            raise
        if max_n > ready.shape[0]:
            max_n = ready.shape[0]
        if max_n > 0 and self._size > 0:
            self.pop_batch_c(max_n, now, <int64_t*>ready.buf, <int64_t*>expired.buf,
                             expired.shape[0], &n_ready, &n_expired)
        PyBuffer_Release(&expired)
        PyBuffer_Release(&ready)
        return n_ready, n_expired

    def drop_expired(self, double now, expired_out):
        """Remove every entry with ``deadline < now`` (anywhere in the heap, not only the top),
        at most ``len(expired_out)`` of them, the first in pop order; ids are written in pop
        order. Returns the count."""
        cdef Py_buffer out
        cdef Py_ssize_t count
        _acquire_ids(expired_out, &out, "expired_out")
        count = self.drop_expired_c(now, <int64_t*>out.buf, out.shape[0])
        PyBuffer_Release(&out)
        return count

    def cancel(self, int64_t rid):
        """Remove request ``rid``; True if it was queued."""
        return self.cancel_c(rid)

    def __len__(self):
        return self._size

    def __contains__(self, rid):
        if not PyIndex_Check(rid):
            return False
        cdef int64_t key
        try:
            key = rid
        except OverflowError:
            return False
        return self._find_bucket(key) >= 0

    @property
    def capacity(self):
        return self._capacity

    def earliest_deadline(self):
        """Minimum deadline over ALL queued entries (+inf when empty). With priorities this is
        not necessarily the head's deadline."""
        return self.earliest_deadline_c()

    def oldest_arrival(self):
        """Minimum arrival over all queued entries (+inf when empty)."""
        return self.oldest_arrival_c()

    def head_deadline(self):
        """Deadline of the entry that would pop next (+inf when empty)."""
        return self.head_deadline_c()

    def head_key(self):
        """Key of the entry that would pop next (+inf when empty): what the scheduler compares
        across models to pick the next batch."""
        return self.head_key_c()

    def head_priority(self):
        """Priority of the entry that would pop next (0 when empty)."""
        return self.head_priority_c()

    def earliest_slack(self, double now):
        """``earliest_deadline() - now``: how long until the most urgent request misses."""
        return self.earliest_deadline_c() - now

    def count_ahead(self, double key, int32_t priority=0):
        """How many queued entries would pop before a new entry with this key and priority
        (higher priority, or equal priority and a key no later: ties go to the earlier push).
        Admission control asks this for each arriving request: O(n), one pass over the heap in C."""
        cdef Py_ssize_t i, ahead = 0
        cdef QueueNode* node
        for i in range(self._size):
            node = &self._heap[i]
            if node.priority > priority or (node.priority == priority and node.key <= key):
                ahead += 1
        return ahead

    def ids(self):
        """Queued ids in key order (pop order). For debugging and tests: O(n log n)."""
        cdef Py_ssize_t n = self._sorted_copy()
        return [self._slot_id[self._scratch[i].slot] for i in range(n)]

    def __repr__(self):
        return f"DeadlineQueue(capacity={self._capacity}, len={self._size})"

    def _check_invariants(self):
        """Raise AssertionError if the C structures disagree (for tests; O(n)).

        Checks the heap order, that every node's slot points back at its heap position, that
        the id index finds every queued id at its slot and holds nothing else, that slots are
        conserved, and that a valid cached minimum is the true one.
        """
        cdef Py_ssize_t i, bucket, occupied = 0
        cdef int32_t slot
        cdef double min_deadline = INFINITY, min_arrival = INFINITY
        for i in range(self._size):
            slot = self._heap[i].slot
            if not 0 <= slot < self._capacity:
                raise AssertionError(f"heap[{i}] has slot {slot} outside 0..{self._capacity - 1}")
            if self._slot_pos[slot] != i:
                raise AssertionError(f"slot {slot} records heap position {self._slot_pos[slot]}, is at {i}")
            if i > 0 and _before(&self._heap[i], &self._heap[(i - 1) >> 1]):
                raise AssertionError(f"heap order broken at position {i}")
            bucket = self._find_bucket(self._slot_id[slot])
            if bucket < 0 or self._index[bucket] != slot:
                raise AssertionError(f"id {self._slot_id[slot]} is not indexed at slot {slot}")
            min_deadline = min(min_deadline, self._slot_deadline[slot])
            min_arrival = min(min_arrival, self._slot_arrival[slot])
        for i in range(<Py_ssize_t>self._index_mask + 1):
            if self._index[i] >= 0:
                occupied += 1
        if occupied != self._size:
            raise AssertionError(f"index holds {occupied} ids, heap holds {self._size}")
        if self._n_free + self._size != self._capacity:
            raise AssertionError(f"{self._n_free} free + {self._size} used slots != {self._capacity}")
        if self._min_deadline_ok and self._min_deadline != min_deadline:
            raise AssertionError(f"cached earliest deadline {self._min_deadline} != {min_deadline}")
        if self._min_arrival_ok and self._min_arrival != min_arrival:
            raise AssertionError(f"cached oldest arrival {self._min_arrival} != {min_arrival}")

    # ------------------------------------------------------------------------------------
    # C surface
    # ------------------------------------------------------------------------------------

    cdef Py_ssize_t size_c(self) noexcept nogil:
        return self._size

    cdef double earliest_deadline_c(self) noexcept nogil:
        cdef Py_ssize_t i
        cdef double m
        if not self._min_deadline_ok:
            m = INFINITY
            for i in range(self._size):
                if self._slot_deadline[self._heap[i].slot] < m:
                    m = self._slot_deadline[self._heap[i].slot]
            self._min_deadline = m
            self._min_deadline_ok = True
        return self._min_deadline

    cdef double oldest_arrival_c(self) noexcept nogil:
        cdef Py_ssize_t i
        cdef double m, a
        if not self._min_arrival_ok:
            m = INFINITY
            for i in range(self._size):
                a = self._slot_arrival[self._heap[i].slot]
                if a < m:
                    m = a
            self._min_arrival = m
            self._min_arrival_ok = True
        return self._min_arrival

    cdef double head_deadline_c(self) noexcept nogil:
        return self._slot_deadline[self._heap[0].slot] if self._size > 0 else INFINITY

    cdef double head_key_c(self) noexcept nogil:
        return self._heap[0].key if self._size > 0 else INFINITY

    cdef int32_t head_priority_c(self) noexcept nogil:
        return self._heap[0].priority if self._size > 0 else 0

    cdef int push_c(self, int64_t rid, double deadline, double arrival, int32_t priority, double key) noexcept nogil:
        cdef int32_t slot
        cdef QueueNode node
        cdef Py_ssize_t bucket = _home_bucket(rid, self._index_shift)
        # One probe answers both "already queued?" and "where does it go?".
        while True:
            slot = self._index[bucket]
            if slot < 0:
                break
            if self._slot_id[slot] == rid:
                return 2
            bucket = (bucket + 1) & self._index_mask
        if self._size >= self._capacity:
            return 1
        self._n_free -= 1
        slot = self._free_slots[self._n_free]
        self._slot_id[slot] = rid
        self._slot_arrival[slot] = arrival
        self._slot_deadline[slot] = deadline
        self._index[bucket] = slot
        node.priority = priority
        node.slot = slot
        node.key = key
        node.seq = self._next_seq
        self._next_seq += 1
        self._size += 1
        _sift_up(self._heap, self._slot_pos, self._size - 1, node)
        if self._min_deadline_ok and deadline < self._min_deadline:
            self._min_deadline = deadline
        if self._min_arrival_ok and arrival < self._min_arrival:
            self._min_arrival = arrival
        return 0

    cdef void pop_batch_c(self, Py_ssize_t max_n, double now,
                          int64_t* ready, int64_t* expired, Py_ssize_t expired_room,
                          Py_ssize_t* n_ready, Py_ssize_t* n_expired) noexcept nogil:
        cdef Py_ssize_t taken = 0, dropped = 0
        while taken < max_n and self._size > 0:
            if self._slot_deadline[self._heap[0].slot] < now:
                if dropped >= expired_room:
                    break
                expired[dropped] = self._pop_top()
                dropped += 1
            else:
                ready[taken] = self._pop_top()
                taken += 1
        n_ready[0] = taken
        n_expired[0] = dropped

    cdef Py_ssize_t drop_expired_c(self, double now, int64_t* out, Py_ssize_t room) noexcept nogil:
        cdef Py_ssize_t i, j, m = 0, kept = 0
        cdef int32_t slot
        cdef QueueNode node
        if room <= 0 or self._size == 0 or not (self.earliest_deadline_c() < now):
            return 0
        for i in range(self._size):
            if self._slot_deadline[self._heap[i].slot] < now:
                self._scratch[m] = self._heap[i]
                m += 1
        qsort(self._scratch, m, sizeof(QueueNode), _compare_nodes)
        if m > room:
            m = room
        if m <= _DROP_ONE_BY_ONE:
            for j in range(m):
                out[j] = self._remove_at(self._slot_pos[self._scratch[j].slot])
            return m
        # Many at once: release them, filter the heap array, re-heapify (Floyd, O(n)).
        for j in range(m):
            slot = self._scratch[j].slot
            out[j] = self._slot_id[slot]
            self._index_delete(self._find_bucket(self._slot_id[slot]))
            self._slot_pos[slot] = -1
            self._free_slots[self._n_free] = slot
            self._n_free += 1
        for i in range(self._size):
            node = self._heap[i]
            if self._slot_pos[node.slot] >= 0:
                self._heap[kept] = node
                self._slot_pos[node.slot] = <int32_t>kept
                kept += 1
        self._size = kept
        i = kept // 2 - 1
        while i >= 0:
            _sift_down(self._heap, self._slot_pos, self._size, i, self._heap[i])
            i -= 1
        self._min_deadline_ok = False
        self._min_arrival_ok = False
        return m

    cdef bint cancel_c(self, int64_t rid) noexcept nogil:
        cdef Py_ssize_t bucket = self._find_bucket(rid)
        if bucket < 0:
            return False
        self._remove_at(self._slot_pos[self._index[bucket]])
        return True

    # ------------------------------------------------------------------------------------
    # Internals
    # ------------------------------------------------------------------------------------

    cdef Py_ssize_t _find_bucket(self, int64_t rid) noexcept nogil:
        """Bucket holding ``rid``'s slot, or -1. Terminates: at least half the buckets are empty."""
        cdef Py_ssize_t bucket = _home_bucket(rid, self._index_shift)
        cdef int32_t slot
        while True:
            slot = self._index[bucket]
            if slot < 0:
                return -1
            if self._slot_id[slot] == rid:
                return bucket
            bucket = (bucket + 1) & self._index_mask

    cdef void _index_delete(self, Py_ssize_t bucket) noexcept nogil:
        """Backward-shift deletion: keeps every probe chain unbroken without tombstones."""
        cdef Py_ssize_t hole = bucket, probe = bucket, home
        cdef int32_t slot
        while True:
            probe = (probe + 1) & self._index_mask
            slot = self._index[probe]
            if slot < 0:
                break
            home = _home_bucket(self._slot_id[slot], self._index_shift)
            # The entry at `probe` may move into `hole` unless its home lies cyclically in
            # (hole, probe]: then the hole is not on its probe path.
            if hole <= probe:
                if hole < home <= probe:
                    continue
            elif home > hole or home <= probe:
                continue
            self._index[hole] = slot
            hole = probe
        self._index[hole] = -1

    cdef int64_t _pop_top(self) noexcept nogil:
        """Remove the head; return its id. Bottom-up, as CPython's heapq does: move the hole at
        the root down to a leaf along the earlier children (one comparison per level), then put
        the former last node there and sift it up (it belongs near the bottom, so this is
        short). About half the comparisons of the textbook sift-down."""
        cdef QueueNode* heap = self._heap
        cdef int32_t* slot_pos = self._slot_pos
        cdef int32_t slot = heap[0].slot
        cdef int64_t rid = self._slot_id[slot]
        cdef Py_ssize_t n, hole = 0, child = 1
        self._size -= 1
        n = self._size
        if n > 0:
            while child < n:
                if child + 1 < n and _before(&heap[child + 1], &heap[child]):
                    child += 1
                heap[hole] = heap[child]
                slot_pos[heap[hole].slot] = <int32_t>hole
                hole = child
                child = 2 * hole + 1
            _sift_up(heap, slot_pos, hole, heap[n])
        self._forget(slot, rid)
        return rid

    cdef void _forget(self, int32_t slot, int64_t rid) noexcept nogil:
        """Bookkeeping after a node left the heap: minima caches, id index, free slot."""
        if self._min_deadline_ok and self._slot_deadline[slot] <= self._min_deadline:
            self._min_deadline_ok = False
        if self._min_arrival_ok and self._slot_arrival[slot] <= self._min_arrival:
            self._min_arrival_ok = False
        self._index_delete(self._find_bucket(rid))
        self._slot_pos[slot] = -1
        self._free_slots[self._n_free] = slot
        self._n_free += 1

    cdef int64_t _remove_at(self, Py_ssize_t pos) noexcept nogil:
        """Remove the node at heap position ``pos``; free its slot and index entry; return its id."""
        cdef QueueNode removed = self._heap[pos]
        cdef QueueNode last
        cdef int32_t slot = removed.slot
        cdef int64_t rid = self._slot_id[slot]
        self._size -= 1
        if pos < self._size:
            last = self._heap[self._size]
            if pos > 0 and _before(&last, &self._heap[(pos - 1) >> 1]):
                _sift_up(self._heap, self._slot_pos, pos, last)
            else:
                _sift_down(self._heap, self._slot_pos, self._size, pos, last)
        self._forget(slot, rid)
        return rid

    cdef Py_ssize_t _sorted_copy(self) noexcept nogil:
        """Copy the heap into the scratch array in key order; return the count."""
        cdef Py_ssize_t i
        for i in range(self._size):
            self._scratch[i] = self._heap[i]
        qsort(self._scratch, self._size, sizeof(QueueNode), _compare_nodes)
        return self._size
