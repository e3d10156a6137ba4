"""Pure-Python twin of ``agent.core._batch_assembly`` (``_core/agent/core/_batch_assembly.pyx``)."""
from __future__ import annotations

import operator
from typing import Any, Sequence

import numpy as np

__all__ = ["gather_into", "scatter_rows"]


def _check_dst(dst: Any) -> None:
    if not isinstance(dst, np.ndarray):
        raise TypeError(f"dst must be a numpy array, got {type(dst).__name__}")
    if dst.ndim < 1 or not dst.flags.c_contiguous or not dst.flags.writeable:
        raise ValueError(
            "dst must be a writable C-contiguous array with a batch axis, "
            f"got shape {dst.shape}, C-contiguous={dst.flags.c_contiguous}, "
            f"writable={dst.flags.writeable}"
        )


def gather_into(dst: np.ndarray, srcs: Sequence[np.ndarray]) -> int:
    """Copy ``srcs[i]`` into ``dst[i]``; return ``len(srcs)``. Rows past it are left untouched.

    ``dst`` is the preallocated batch buffer, shape ``(B, *item_shape)``, C-contiguous. Each
    source is a C-contiguous array of dst's dtype with shape ``item_shape`` or
    ``(1, *item_shape)`` (a request's tensor with or without its own batch axis). A mismatch is
    a ValueError naming the index and what differs; nothing is copied unless all sources pass.
    """
    _check_dst(dst)
    srcs = list(srcs)
    rows = dst.shape[0]
    if len(srcs) > rows:
        raise ValueError(f"srcs has {len(srcs)} arrays but dst holds only {rows} rows")
    item_shape = dst.shape[1:]
    for i, src in enumerate(srcs):
        if isinstance(src, np.generic):  # a numpy scalar exposes a buffer too: a 0-d array
            src = srcs[i] = np.asarray(src)
        if not isinstance(src, np.ndarray):
            raise TypeError(f"srcs[{i}] must be a numpy array, got {type(src).__name__}")
        if not src.flags.c_contiguous:
            raise ValueError(f"srcs[{i}] must be C-contiguous")
        if src.dtype != dst.dtype:
            raise ValueError(f"srcs[{i}] has dtype {src.dtype} but dst has dtype {dst.dtype}")
        if src.shape != item_shape and src.shape != (1, *item_shape):
            raise ValueError(
                f"srcs[{i}] has shape {src.shape} but a row of dst has shape {item_shape} "
                f"(or {(1, *item_shape)})"
            )
    for i, src in enumerate(srcs):
        np.copyto(dst[i : i + 1], src.reshape((1, *item_shape)))
    return len(srcs)


def scatter_rows(src: np.ndarray, n: int) -> list[np.ndarray]:
    """Split the first ``n`` rows of a backend's output into one array per request.

    Row ``i`` has shape ``(1, *src.shape[1:])``. The rows are views into ONE fresh copy of
    ``src[:n]``: one allocation per batch instead of one per request, and independent of
    ``src``, because a backend may reuse its output buffer for the next batch while replies are
    still being encoded. The copy is freed when the last row is dropped.
    """
    if not isinstance(src, np.ndarray):
        raise TypeError(f"src must be a numpy array, got {type(src).__name__}")
    if src.ndim < 1:
        raise ValueError(f"src must have a batch axis, got shape {src.shape}")
    n = operator.index(n)
    rows = src.shape[0]
    if not 0 <= n <= rows:
        raise ValueError(f"n must be in 0..{rows} (rows of src), got {n}")
    block = np.array(src[:n], order="C", copy=True)
    return [block[i : i + 1] for i in range(n)]
