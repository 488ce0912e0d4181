"""Which of torch's two fp32 GEMM libraries runs the fused stacks' large GEMMs on the CPU.

``torch.mm`` runs MKL on the CPU. torch's wheel also carries oneDNN, reachable through
``torch.ops.mkldnn._linear_pointwise`` (the call inductor's CPU code makes for a linear layer). On
an AMD EPYC with AVX-512 (Zen 4) oneDNN ran W2's large GEMMs 1.2-1.3x faster than MKL and reached
182-204 GFLOP/s where MKL reached 125-164; on a Zen 5 EPYC it reached 346-437 GFLOP/s against MKL's
156-183; on the Intel Xeons of earlier rounds, and on a Zen 3 EPYC without AVX-512, it was the
slower one (W2 MMoE's training step 4-11 % slower there; ``docs/performance-log.md``, rounds 16, 33,
34 and 49). Both compute the same fp32 products, summed in different orders.

The library is chosen once per process, by the CPU's vendor and its AVX-512, never by timing each
run: a seeded run then gives the same numbers on every run of one machine. ``MTLKIT_CPU_GEMM=mkl`` or
``onednn`` forces one (``auto``, the default: oneDNN on AMD CPUs with AVX-512, MKL elsewhere). oneDNN gets only the GEMMs
it is fast on: fp32 CPU matrices large enough that its call overhead does not show, whose second
operand (the linear layer's weight) is a contiguous matrix or the transpose of one; one sliced out
of wider rows sent it to a path 700 times slower than MKL's. The linear call copies a first operand
that is not contiguous before the GEMM; that costs little for rows out of wider rows, but a
transposed slice made the call no faster than MKL's, so such a first operand stays with MKL.

oneDNN takes one matrix per call, so a batched GEMM becomes one call per batch entry, each writing a
new matrix. :func:`matmul_into` and :func:`bmm_into` place those into the caller's output through a
``pointwise`` pass of the caller's (a ReLU, a ReLU's gradient mask, a bias), which the caller makes
anyway: the copy rides on it. On a Zen 5 EPYC oneDNN ran an 8-expert ``[2048, 257] @ [257, 128]``
layer this way, ReLU included, in 3.6 ms against MKL's 7.4 (performance log, round 34).
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Callable

import torch

from mtlkit.errors import ConfigError

__all__ = ["CPU_GEMM_LIBRARIES", "Pointwise", "bmm_into", "copies_strided_operands", "cpu_gemm_library", "forced_cpu_gemm_library",
           "matmul", "matmul_into", "onednn_matmul", "uses_onednn", "uses_onednn_batched"]

CPU_GEMM_LIBRARIES = ("auto", "mkl", "onednn")
# Below this many multiply-adds (m * k * n) a GEMM stays with MKL: W2's large GEMMs are about 10^9.
_MIN_ONEDNN_WORK = 1 << 26
# A batched GEMM of more entries than this (the mixing's small product per row) stays one MKL call.
_MAX_ONEDNN_BATCH = 64
_forced: str | None = None


@functools.lru_cache(maxsize=None)
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return ""


def _cpuinfo_field(name: str) -> str:
    """The first value of ``name`` in ``/proc/cpuinfo`` ("" where there is none, or no such file)."""
    for line in _cpuinfo().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return ""


def _cpu_vendor() -> str:
    return _cpuinfo_field("vendor_id")


def _cpu_has_avx512() -> bool:
    return "avx512f" in _cpuinfo_field("flags").split()


@functools.lru_cache(maxsize=None)
def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def cpu_gemm_library() -> str:
    """The library the fused stacks' large CPU GEMMs run through in this process: ``"mkl"`` or
    ``"onednn"`` (``MTLKIT_CPU_GEMM``, or by the CPU: oneDNN on AMD CPUs with AVX-512; MKL where this
    torch has no oneDNN)."""
    choice = _forced or os.environ.get("MTLKIT_CPU_GEMM", "auto")
    if choice not in CPU_GEMM_LIBRARIES:
        raise ConfigError(f"MTLKIT_CPU_GEMM: expected one of {list(CPU_GEMM_LIBRARIES)}, got {choice!r}")
    if choice == "auto":
        choice = "onednn" if _cpu_vendor() == "AuthenticAMD" and _cpu_has_avx512() else "mkl"
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


def _readable(t: torch.Tensor, first: bool) -> bool:
    """Whether oneDNN takes ``t`` on its fast path: a contiguous matrix or the transpose of one, or, as
    a first operand (which the call copies when it is not contiguous), rows out of wider rows."""
    rows, cols = t.shape
    strides = t.stride()
    return strides in ((cols, 1), (1, rows)) or (first and strides[1] == 1 and strides[0] >= cols)


def _fits_onednn(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a @ b`` (2-D) is float32 on the CPU, large enough and laid out for oneDNN's fast path."""
    return (a.device.type == "cpu" and a.dtype == b.dtype == torch.float32
            and a.shape[0] * a.shape[1] * b.shape[1] >= _MIN_ONEDNN_WORK and _readable(a, True) and _readable(b, False))


def uses_onednn(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether :func:`matmul` runs ``a @ b`` (2-D) through oneDNN: never in a graph being traced
    (compile, ``torch.export``), which keeps aten's GEMM (no guard on a dynamic batch size, and an
    exported program that serves anywhere)."""
    if torch.compiler.is_compiling():
        return False
    return a.dim() == b.dim() == 2 and _fits_onednn(a, b) and cpu_gemm_library() == "onednn"


def uses_onednn_batched(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether :func:`bmm_into` runs ``a @ b`` (3-D) as one oneDNN call per batch entry: each entry as
    :func:`uses_onednn` would take it, and at most a few dozen entries."""
    if torch.compiler.is_compiling():
        return False
    return (a.dim() == b.dim() == 3 and 0 < a.shape[0] <= _MAX_ONEDNN_BATCH and _fits_onednn(a[0], b[0])
            and cpu_gemm_library() == "onednn")


def copies_strided_operands(t: torch.Tensor) -> bool:
    """Whether aten's GEMMs copy an operand of ``t``'s kind before multiplying when it is neither
    contiguous nor the transpose of a contiguous matrix (rows out of wider rows, a batch expanded with
    stride 0): bf16 on the CPU, which runs through oneDNN. Under ``torch.profiler`` W2 MMoE's bf16
    step spent 9 of its 55 ms in such copies on a Zen 4 EPYC (performance log, round 36); fp32 CPU
    GEMMs (MKL) read any leading dimension."""
    return t.device.type == "cpu" and t.dtype == torch.bfloat16


def onednn_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (2-D) through oneDNN, whatever the process's library: a linear layer of weight
    ``b^T``, ``[M, K] @ ([N, K])^T``."""
    return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (``[M, K] @ [K, N] -> [M, N]``, a new contiguous tensor) through this process's library."""
    return onednn_matmul(a, b) if uses_onednn(a, b) else torch.mm(a, b)


Pointwise = Callable[[torch.Tensor, torch.Tensor, "int | None"], object]
"""``pointwise(src, dst, entry)`` writes an elementwise function of ``src`` into ``dst`` (``src`` may
be ``dst``): ``entry`` is the batch index of ``dst`` in a batched output, or None when ``dst`` is the
whole output, so the caller can pick the matching slice of any other operand (a mask, a bias)."""


def _copy_into(src: torch.Tensor, dst: torch.Tensor, entry: int | None) -> None:
    """The pointwise pass of a bare product: a copy, none when the GEMM wrote ``dst`` itself."""
    if src is not dst:
        dst.copy_(src)


def matmul_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, pointwise: Pointwise | None = None) -> torch.Tensor:
    """``out = pointwise(a @ b)`` (2-D; ``out`` any view, a column slice say) through this process's
    library; without ``pointwise`` the product itself. Returns ``out``."""
    pointwise = pointwise or _copy_into
    if uses_onednn(a, b):
        pointwise(onednn_matmul(a, b), out, None)
    else:
        torch.mm(a, b, out=out)
        pointwise(out, out, None)
    return out


def bmm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, pointwise: Pointwise | None = None) -> torch.Tensor:
    """``out = pointwise(a @ b)`` batched (``[S, M, K] @ [S, K, N] -> [S, M, N]``, any strides): one MKL
    ``bmm`` and then ``pointwise`` over the whole output, or one oneDNN GEMM per entry, each written
    into place by ``pointwise`` (module docstring). Returns ``out``."""
    pointwise = pointwise or _copy_into
    if uses_onednn_batched(a, b):
        # One copy of a first operand the entries share (stride 0), not one per call.
        shared = a[0].contiguous() if a.stride(0) == 0 else None
        for entry in range(a.shape[0]):
            pointwise(onednn_matmul(a[entry] if shared is None else shared, b[entry]), out[entry], entry)
    else:
        torch.bmm(a, b, out=out)
        pointwise(out, out, None)
    return out
