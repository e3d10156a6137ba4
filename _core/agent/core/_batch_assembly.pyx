# cython: language_level=3, embedsignature=True
"""Batch assembly: requests' tensors into one preallocated batch buffer, and back.

Compiled as agent.core._batch_assembly; the specification is ``agent.core.pure.gather_into`` /
``scatter_rows``. ``gather_into`` takes every source's buffer through the buffer protocol,
validates all of them first (nothing is written unless every source is right), then copies with
one ``memcpy`` per source in a C loop, without the GIL when the batch is large enough for that to
pay off. No numpy C API: the dtype check compares buffer format strings, falling back to a
numpy dtype comparison only when they differ ('l' and 'q' are both int64 on LP64).
"""
from cpython.buffer cimport (
    PyObject_GetBuffer,
    PyBuffer_Release,
    PyBUF_C_CONTIGUOUS,
    PyBUF_FORMAT,
    PyBUF_WRITABLE,
)
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, strcmp

import numpy as np

# Below this many bytes the copy takes less time than releasing and re-taking the GIL.
cdef Py_ssize_t _NOGIL_BYTES = 1 << 16


cdef void _copy_rows(char* dst, Py_buffer* views, Py_ssize_t n, Py_ssize_t row_bytes) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        memcpy(dst + i * row_bytes, views[i].buf, row_bytes)


cdef char* _UNSIGNED_BYTE = "B"  # a NULL format means unsigned bytes (PEP 3118)


cdef bint _same_format(const Py_buffer* a, const Py_buffer* b) noexcept:
    cdef const char* fa = a.format if a.format != NULL else _UNSIGNED_BYTE
    cdef const char* fb = b.format if b.format != NULL else _UNSIGNED_BYTE
    return strcmp(fa, fb) == 0


cdef tuple _shape_of(const Py_buffer* view):
    return tuple([view.shape[i] for i in range(view.ndim)])


def gather_into(dst, srcs):
    """Copy ``srcs[i]`` into ``dst[i]`` (one memcpy each); return ``len(srcs)``.

    ``dst``: C-contiguous, writable, shape ``(B, *item_shape)``. Each source: C-contiguous, same
    dtype, shape ``item_shape`` or ``(1, *item_shape)``. Errors name the index and what differs.
    """
    cdef Py_buffer dst_view
    cdef Py_buffer* views = NULL
    cdef Py_ssize_t n, i, k, rows, row_bytes = 0, acquired = 0
    cdef Py_ssize_t item_ndim, offset
    cdef bint shape_ok
    cdef char* dst_buf
    items = srcs if type(srcs) is list or type(srcs) is tuple else list(srcs)
    n = len(items)
    try:
        PyObject_GetBuffer(dst, &dst_view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE)
    except TypeError:
        raise TypeError(f"dst must be a numpy array, got {type(dst).__name__}") from None
    except (ValueError, BufferError) as exc:
        raise ValueError(
            f"dst must be a writable C-contiguous array with a batch axis: {exc}") from None
    try:
        if dst_view.ndim < 1:
            raise ValueError(
                f"dst must be a writable C-contiguous array with a batch axis, got shape ()")
        rows = dst_view.shape[0]
        if n > rows:
            raise ValueError(f"srcs has {n} arrays but dst holds only {rows} rows")
        if n == 0:
            return 0
        row_bytes = dst_view.len // rows
        item_ndim = dst_view.ndim - 1
        views = <Py_buffer*>malloc(n * sizeof(Py_buffer))
        if views == NULL:
            raise MemoryError("cannot allocate buffer views for gather_into")
        for i in range(n):
            src = items[i]
            try:
                PyObject_GetBuffer(src, &views[i], PyBUF_C_CONTIGUOUS | PyBUF_FORMAT)
            except TypeError:
                raise TypeError(
                    f"srcs[{i}] must be a numpy array, got {type(src).__name__}") from None
            except (ValueError, BufferError) as exc:
                raise ValueError(f"srcs[{i}] must be C-contiguous ({exc})") from None
            acquired += 1
            if not _same_format(&views[i], &dst_view) or views[i].itemsize != dst_view.itemsize:
                src_dtype = getattr(src, "dtype", None)
                dst_dtype = getattr(dst, "dtype", None)
                if src_dtype is None or dst_dtype is None or src_dtype != dst_dtype:
                    raise ValueError(
                        f"srcs[{i}] has dtype {src_dtype} but dst has dtype {dst_dtype}")
            # Shape: item_shape, or (1, *item_shape).
            offset = views[i].ndim - item_ndim
            shape_ok = offset == 0 or (offset == 1 and views[i].shape[0] == 1)
            if shape_ok:
                for k in range(item_ndim):
                    if views[i].shape[offset + k] != dst_view.shape[1 + k]:
                        shape_ok = False
                        break
            if not shape_ok or views[i].len != row_bytes:
                item_shape = _shape_of(&dst_view)[1:]
                raise ValueError(
                    f"srcs[{i}] has shape {_shape_of(&views[i])} but a row of dst has shape "
                    f"{item_shape} (or {(1,) + item_shape})")
        dst_buf = <char*>dst_view.buf
        if n * row_bytes >= _NOGIL_BYTES:
            with nogil:
                _copy_rows(dst_buf, views, n, row_bytes)
        else:
            _copy_rows(dst_buf, views, n, row_bytes)
        return n
    finally:
        for i in range(acquired):
            PyBuffer_Release(&views[i])
        free(views)
        PyBuffer_Release(&dst_view)


def scatter_rows(src, Py_ssize_t n):
    """Split the first ``n`` rows of a backend's output into one ``(1, *rest)`` array per
    request: views into ONE fresh copy of ``src[:n]`` (one allocation per batch, and safe when
    the backend reuses its output buffer for the next batch)."""
    if not isinstance(src, np.ndarray):
        raise TypeError(f"src must be a numpy array, got {type(src).__name__}")
    if src.ndim < 1:
        raise ValueError(f"src must have a batch axis, got shape {src.shape}")
    cdef Py_ssize_t rows = src.shape[0]
    cdef Py_ssize_t i
    if not 0 <= n <= rows:
        raise ValueError(f"n must be in 0..{rows} (rows of src), got {n}")
    block = np.array(src[:n], order="C", copy=True)
    return [block[i:i + 1] for i in range(n)]
