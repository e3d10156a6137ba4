# C-level declaration of the deadline queue, for other compiled modules (uvloop style).
#
# Why this file and its .pyx live at _core/agent/core/ and not flat in _core/: Cython finds a
# module's .pxd (and, at run time, imports the module that owns a shared cdef class) by the
# module's fully qualified name. The extension is agent.core._deadline_queue, so its declarations
# must be found as agent/core/_deadline_queue.pxd on the include path (include_path=["_core"] in
# setup.py), and the .pyx sits beside its .pxd. A flat _core/deadline_queue.pxd would make
# cimporters look for a top-level module "deadline_queue" at run time.
#
# cimport it as:  from agent.core._deadline_queue cimport DeadlineQueue

cimport cython
from libc.stdint cimport int32_t, int64_t, uint64_t


# One heap node: the ordering key inline (no pointer chase while sifting) plus the slot that
# holds the rest of the entry (its deadline among it). 24 bytes.
ctypedef struct QueueNode:
    int32_t priority
    int32_t slot
    double key
    uint64_t seq


@cython.final
cdef class DeadlineQueue:
    # Binary heap of nodes, in pop order: higher priority, earlier key, earlier seq.
    cdef QueueNode* _heap
    # Scratch space (capacity nodes) for drop_expired and ids(): no allocation per call.
    cdef QueueNode* _scratch
    # Per-slot data. A slot is stable for an entry's whole stay, so heap moves only update
    # _slot_pos (an array write), never the id index (a hash probe).
    cdef int64_t* _slot_id
    cdef double* _slot_arrival
    cdef double* _slot_deadline
    cdef int32_t* _slot_pos
    cdef int32_t* _free_slots
    cdef Py_ssize_t _n_free
    # id -> slot: open addressing, linear probing, load factor <= 1/2, -1 = empty bucket.
    cdef int32_t* _index
    cdef uint64_t _index_mask
    cdef int _index_shift
    cdef Py_ssize_t _size
    cdef Py_ssize_t _capacity
    cdef uint64_t _next_seq
    # Cached minima over all entries; invalidated when the entry holding them leaves.
    cdef double _min_deadline
    cdef double _min_arrival
    cdef bint _min_deadline_ok
    cdef bint _min_arrival_ok

    # ---- C-level surface (no Python objects, callable without the GIL) ----
    cdef Py_ssize_t size_c(self) noexcept nogil
    cdef double earliest_deadline_c(self) noexcept nogil
    cdef double oldest_arrival_c(self) noexcept nogil
    cdef double head_deadline_c(self) noexcept nogil
    cdef double head_key_c(self) noexcept nogil
    cdef int32_t head_priority_c(self) noexcept nogil
    # 0 = OK, 1 = FULL, 2 = DUPLICATE (PushResult values); deadline/arrival/key must not be NaN.
    cdef int push_c(self, int64_t rid, double deadline, double arrival, int32_t priority, double key) noexcept nogil
    cdef void pop_batch_c(self, Py_ssize_t max_n, double now,
                          int64_t* ready, int64_t* expired, Py_ssize_t expired_room,
                          Py_ssize_t* n_ready, Py_ssize_t* n_expired) noexcept nogil
    cdef Py_ssize_t drop_expired_c(self, double now, int64_t* out, Py_ssize_t room) noexcept nogil
    cdef bint cancel_c(self, int64_t rid) noexcept nogil

    # ---- internals ----
    cdef Py_ssize_t _find_bucket(self, int64_t rid) noexcept nogil
    cdef void _index_delete(self, Py_ssize_t bucket) noexcept nogil
    cdef int64_t _remove_at(self, Py_ssize_t pos) noexcept nogil
    cdef int64_t _pop_top(self) noexcept nogil
    cdef void _forget(self, int32_t slot, int64_t rid) noexcept nogil
    cdef Py_ssize_t _sorted_copy(self) noexcept nogil
