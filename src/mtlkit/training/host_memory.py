"""Keep the memory a training step frees for the next step, instead of handing it back to the OS.

PyTorch allocates CPU tensors with the C library's ``malloc``. glibc serves large blocks (above a
threshold that starts at 128 KiB and adapts) with fresh ``mmap`` pages and returns them to the kernel
on ``free``, and it trims the top of its heap whenever more than a few hundred KiB lie free there. A
training step frees its activations and gradients at the end and allocates the same sizes again at
the start of the next one, so each step page-faults its large temporaries back in: on W2 of
``benchmarks/`` (8 MiB activations) 200 to 2,700 page faults per step, 2-5 % of the step on this
machine, and a step time that varies with the heap's history. Raising both thresholds makes glibc
recycle those blocks (under 70 faults per step). The cost is that memory freed by training stays
with the process until it exits, which the peak RSS (what limits a job) already counted.

Only glibc has ``mallopt``; elsewhere (macOS, Windows, musl) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

__all__ = ["keep_freed_host_memory"]

# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap and are reused; above it glibc still maps and unmaps
# them (an evaluation batch of a very large model, say), so nothing is held beyond that.
_KEEP_BELOW = 1 << 30


@functools.lru_cache(maxsize=1)
def keep_freed_host_memory() -> bool:
    """Make glibc reuse freed blocks below 1 GiB instead of unmapping them; process-wide, once.

    Returns whether the setting took effect (False where the C library is not glibc).
    """
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # only glibc has it; other C libraries' mallopt differ
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BELOW)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BELOW))
