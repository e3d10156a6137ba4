"""The C allocator's policy for the agent's process: big buffers in mappings of their own, always.

glibc's malloc serves a request of at least its mmap threshold (128 KiB to start with) with a
mapping of its own, unmapped when freed. But the threshold moves: each time such a mapping is freed
the threshold rises to its size (up to 32 MiB), and from then on buffers that big come from the
heap of the thread that asks. In the agent the big transient buffers are the requests' payloads:
an MQTT message of a few hundred kilobytes is read, copied out of its packet and refused or decoded
on the MQTT network thread, and after the first such buffer is freed the next ones land in that
thread's heap. Between them the same thread allocates what lives on (the de-duplication window's
tables, paho's state), so the freed space sits below live blocks, cannot be trimmed from the top of
the heap, and stays resident for good (BENCHMARKS.md, issue 21's RSS target). Setting the
threshold explicitly (``mallopt(M_MMAP_THRESHOLD)``) turns the adjustment off, so a big buffer is
always its own mapping and goes back to the kernel when freed.

What it costs: a request buffer of 128 KiB or more is mapped and unmapped each time (a few
microseconds and its page faults, small beside a model run on an input that large). The batch
buffers are allocated once per instance (``agent.runtime.local_executor``) and onnxruntime's
arena regions once per session, so neither pays it per batch. A ``MALLOC_MMAP_THRESHOLD_`` in the
environment is the operator's choice and is left as it is; elsewhere than glibc nothing changes.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

#: glibc's ``M_MMAP_THRESHOLD`` parameter number (malloc.h).
M_MMAP_THRESHOLD = -3
#: glibc's own starting threshold, kept: only the adjustment is turned off.
MMAP_THRESHOLD_BYTES = 128 * 1024


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process (module docstring).
    Returns whether it was set: not where the environment sets it already, nor without glibc."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version       # glibc only: another libc's mallopt takes other numbers
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, threshold) != 1:
        log.warning("mallopt(M_MMAP_THRESHOLD, %d) was refused: big buffers may stay in the heap", threshold)
        return False
    return True
