"""The agent's allocator policy (:mod:`agent.ops.allocator`), in a process of its own each time:
a big buffer is its own mapping even after a bigger one was freed, so it leaves no resident hole
in a thread's heap (issue 21's RSS target)."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

_PROBE = """
import ctypes, sys
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "pin":
    from agent.ops.allocator import pin_mmap_threshold
    print("pinned" if pin_mmap_threshold() else "unpinned")
libc.free(libc.malloc(1 << 20))            # a 1 MiB buffer, mapped and freed: glibc would now raise its threshold
before = libc.mallinfo2().hblks
buffer = libc.malloc(200 * 1024)           # a payload-sized buffer
print(libc.mallinfo2().hblks - before)     # 1: a mapping of its own; 0: taken from the heap
libc.free(buffer)
"""


def _glibc() -> bool:
    try:
        ctypes.CDLL("libc.so.6").mallinfo2
        return True
    except (OSError, AttributeError):
        return False


def _probe(mode: str, env: dict | None = None) -> list[str]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], check=True, capture_output=True, text=True,
                         env=env)
    return out.stdout.split()


@pytest.mark.skipif(not _glibc(), reason="glibc's malloc only (mallinfo2: glibc 2.33 or later)")
def test_a_big_buffer_is_its_own_mapping_after_a_bigger_one_was_freed():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    assert _probe("pin", env) == ["pinned", "1"]
    # Without the pin glibc's threshold follows the freed 1 MiB mapping and the buffer comes from
    # the heap: what the pin is there to stop.
    assert _probe("none", env) == ["0"]


@pytest.mark.skipif(not _glibc(), reason="glibc's malloc only")
def test_an_operators_threshold_in_the_environment_is_left_alone():
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(4 << 20)}
    assert _probe("pin", env) == ["unpinned", "0"]     # 200 KiB < the operator's 4 MiB: from the heap
