"""Keeping the memory one training step frees for the next (glibc's ``malloc``).

PyTorch's CPU tensors come from ``malloc``. glibc serves blocks above a dynamic threshold (128 KiB
at start, raised to the largest block freed so far) with fresh ``mmap`` pages, and hands the top of
its heap back to the kernel whenever more than twice that threshold is free there. A step whose
temporaries land at the top of the heap then gives their pages back at the end of every step and
page-faults them in again in the next one. Measured on a 2-core AMD EPYC VM (``docs/performance-log.md``,
round 9): W1 PLE's step took up to 554 page faults and 1.25 ms of system time per 2-3 ms step (under
2 faults and 20-50 us with the thresholds below), W2 PLE's 1,500-7,300 faults and up to 14 ms per
130-150 ms step (0.2-2,300 with them).

Setting the thresholds is process-wide and lasts for the process, like ``torch.set_num_threads``;
:class:`~mtlkit.training.Trainer` does it unless ``TrainerConfig.keep_freed_memory`` is False. Peak
memory does not grow: the pages kept are those the next step allocates again.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory"]

# Blocks above this still get their own mapping, returned at free (glibc's own ceiling for its
# dynamic threshold on 64-bit systems). W2's largest activation is 17 MB.
MMAP_THRESHOLD = 32 << 20
# Free memory at the top of the heap kept before any is handed back (twice the above, as glibc's
# dynamic rule would set it).
TRIM_THRESHOLD = 64 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")

_kept = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process (see the module docstring).

    Does nothing, and returns False, off Linux, under a C library other than glibc, or when the
    process's environment already sets ``malloc``'s thresholds (``MALLOC_*_`` or ``GLIBC_TUNABLES``):
    the user's choice wins.

    Returns:
        Whether the thresholds are now this module's.
    """
    global _kept
    if _kept:
        return True
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _ENVIRONMENT):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process runs on
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only: musl's mallopt ignores these parameters
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Setting either threshold also stops glibc from moving them, which is the point.
    _kept = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _kept
