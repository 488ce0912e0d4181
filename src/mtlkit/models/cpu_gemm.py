"""Which of torch's two fp32 GEMM libraries runs the fused stacks' large GEMMs on the CPU.

``torch.mm`` runs MKL on the CPU. torch's wheel also carries oneDNN, reachable through
``torch.ops.mkldnn._linear_pointwise`` (the call inductor's CPU code makes for a linear layer). On
an AMD EPYC with AVX-512 oneDNN ran W2's large GEMMs 1.2-1.3x faster than MKL and reached 182-204
GFLOP/s where MKL reached 125-164; on the Intel Xeons of earlier rounds it was the slower one
(``docs/performance-log.md``, rounds 16 and 33). Both compute the same fp32 products, summed in
different orders.

The library is chosen once per process, by the CPU's vendor, never by timing each run: a seeded run
then gives the same numbers on every run of one machine. ``MTLKIT_CPU_GEMM=mkl`` or ``onednn``
forces one (``auto``, the default: oneDNN on AMD CPUs, MKL elsewhere). oneDNN gets only the GEMMs
it is fast on: fp32 CPU matrices large enough that its call overhead does not show, each operand a
contiguous matrix or the transpose of one (a slice out of wider rows sent it to a path 700 times
slower than MKL's).
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import torch

from mtlkit.errors import ConfigError

__all__ = ["CPU_GEMM_LIBRARIES", "cpu_gemm_library", "forced_cpu_gemm_library", "matmul", "onednn_matmul", "uses_onednn"]

CPU_GEMM_LIBRARIES = ("auto", "mkl", "onednn")
# Below this many multiply-adds (m * k * n) a GEMM stays with MKL: W2's large GEMMs are about 10^9.
_MIN_ONEDNN_WORK = 1 << 26
_forced: str | None = None


@functools.lru_cache(maxsize=None)
def _cpu_vendor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return ""


@functools.lru_cache(maxsize=None)
def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def cpu_gemm_library() -> str:
    """The library the fused stacks' large CPU GEMMs run through in this process: ``"mkl"`` or
    ``"onednn"`` (``MTLKIT_CPU_GEMM``, or by the CPU's vendor; MKL where this torch has no oneDNN)."""
    choice = _forced or os.environ.get("MTLKIT_CPU_GEMM", "auto")
    if choice not in CPU_GEMM_LIBRARIES:
        raise ConfigError(f"MTLKIT_CPU_GEMM: expected one of {list(CPU_GEMM_LIBRARIES)}, got {choice!r}")
    if choice == "auto":
        choice = "onednn" if _cpu_vendor() == "AuthenticAMD" else "mkl"
    return choice if choice == "mkl" or _onednn_available() else "mkl"


@contextlib.contextmanager
def forced_cpu_gemm_library(name: str):
    """Run the block with ``name`` (``"mkl"``, ``"onednn"`` or ``"auto"``) as the library, whatever the
    environment says (tests, and the benchmarks' FLOP counting, which sees MKL's GEMMs only)."""
    global _forced
    if name not in CPU_GEMM_LIBRARIES:
        raise ConfigError(f"cpu gemm library: expected one of {list(CPU_GEMM_LIBRARIES)}, got {name!r}")
    before, _forced = _forced, name
    try:
        yield
    finally:
        _forced = before


def _plain_matrix(t: torch.Tensor) -> bool:
    """A contiguous matrix or the transpose of one."""
    rows, cols = t.shape
    return t.stride() in ((cols, 1), (1, rows))


def uses_onednn(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether :func:`matmul` runs ``a @ b`` through oneDNN: never in a graph being traced (compile,
    ``torch.export``), which keeps aten's GEMM (no guard on a dynamic batch size, and an exported
    program that serves anywhere)."""
    if torch.compiler.is_compiling():
        return False
    return (a.device.type == "cpu" and a.dtype == b.dtype == torch.float32 and a.dim() == b.dim() == 2
            and a.shape[0] * a.shape[1] * b.shape[1] >= _MIN_ONEDNN_WORK and _plain_matrix(a) and _plain_matrix(b)
            and cpu_gemm_library() == "onednn")


def onednn_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (2-D) through oneDNN, whatever the process's library: a linear layer of weight
    ``b^T``, ``[M, K] @ ([N, K])^T``."""
    return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (``[M, K] @ [K, N] -> [M, N]``, a new contiguous tensor) through this process's library."""
    return onednn_matmul(a, b) if uses_onednn(a, b) else torch.mm(a, b)
