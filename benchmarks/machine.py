"""This machine's roofline: the matmul peak, a model's FLOPs per sample and its GEMM-only bound."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Callable
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

GEMMS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm}


def _best_seconds(fn, repeats: int, rounds: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def cpu_description() -> str:
    """The CPU's model name and its per-core L2 and shared L3 sizes, as Linux reports them.

    The ratios to the reference libraries move with the hardware (W1's with the per-operator cost,
    W2's with the GEMMs), so a result is only comparable with another taken on the same CPU.
    """
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
        caches = []
        for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
            level = (index / "level").read_text().strip()
            if level in ("2", "3"):
                caches.append(f"L{level} {(index / 'size').read_text().strip()}")
    except OSError:  # not Linux
        caches = []
    return ", ".join([name, *caches])


def matmul_peaks_gflops(m: int = 2048, k: int = 512, n: int = 2048) -> dict[str, float]:
    """The CPU's fp32 matmul peak through each GEMM library torch carries: ``{"mkl": ..., "onednn": ...}``
    (oneDNN where this build has it). Which is faster depends on the CPU (``mtlkit.models.cpu_gemm``)."""
    from mtlkit.models import cpu_gemm

    peaks = {"mkl": matmul_peak_gflops(m, k, n)}
    if cpu_gemm._onednn_available():
        a, b = torch.randn(m, k), torch.randn(k, n)
        peaks["onednn"] = 2 * m * k * n / _best_seconds(lambda: cpu_gemm.onednn_matmul(a, b), 10) / 1e9
    return peaks


def matmul_peak_gflops(m: int = 2048, k: int = 512, n: int = 2048, device: str = "cpu") -> float:
    """fp32 GFLOP/s of a large square-ish matmul (the machine's practical peak) on ``device``
    (on the CPU through MKL, what ``torch.mm`` runs; :func:`matmul_peaks_gflops` for every library)."""
    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    if torch.device(device).type == "cuda":  # queued kernels: time a synchronised batch of them
        def product() -> None:
            for _ in range(20):
                a @ b
            torch.cuda.synchronize(device)

        return 20 * 2 * m * k * n / _best_seconds(product, 5) / 1e9
    return 2 * m * k * n / _best_seconds(lambda: a @ b, 10) / 1e9


class GemmRecorder(TorchDispatchMode):
    """Records every GEMM a block of code runs: ``(plain overload, shapes, strides, seconds)``.

    The plain overload is kept also when the model called the ``out=`` one, so each call can be
    re-timed on fresh operands; ``seconds`` is the call's own time where it ran. ``with_onednn`` also
    records oneDNN's linear, ``mkldnn::_linear_pointwise(input [M, K], weight [N, K], ...)``.
    """

    def __init__(self, with_onednn: bool = False) -> None:
        super().__init__()
        self.calls: list[tuple] = []
        from mtlkit.models import cpu_gemm

        # oneDNN's linear (``mtlkit.models.cpu_gemm`` on AMD CPUs with AVX-512) is recorded only on request: the FLOP
        # count and the bound see the step with MKL forced, where it does not run.
        with_onednn = with_onednn and cpu_gemm._onednn_available()
        self._recorded = GEMMS | ({torch.ops.mkldnn._linear_pointwise} if with_onednn else set())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket not in self._recorded:
            return func(*args, **(kwargs or {}))
        start = time.perf_counter()
        result = func(*args, **(kwargs or {}))
        elapsed = time.perf_counter() - start
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        self.calls.append((func.overloadpacket.default, tuple(tuple(t.shape) for t in tensors),
                           tuple(t.stride() for t in tensors), elapsed))
        return result


def step_profile(step) -> tuple[float, list[tuple]]:
    """FLOPs of one training step's maths (forward + backward) and the GEMM calls it makes.

    The FLOPs are counted with mtlkit's padding of small mixings off (``models/gates.py``): its zero
    rows are work the code executes, not work the model needs. The GEMM calls are the executed ones,
    all run through MKL here: the FLOP counter and the recorder see aten's GEMMs only, and oneDNN's
    calls (``mtlkit.models.cpu_gemm``) compute the same products; :func:`fastest_gemm_forms` then times each
    in the faster library.
    """
    from mtlkit.models import cpu_gemm, gates

    counter = FlopCounterMode(display=False)
    with counter, mock.patch.object(gates, "_PAD_MIXING_FROM", float("inf")), cpu_gemm.forced_cpu_gemm_library("mkl"):
        step()
    recorder = GemmRecorder()
    with recorder, cpu_gemm.forced_cpu_gemm_library("mkl"):
        step()
    return counter.get_total_flops(), recorder.calls


def _single_gemm_shape(func, shapes: tuple, strides: tuple) -> tuple[int, int, int] | None:
    """``(m, k, n)`` of the one 2-D GEMM that computes the call: itself for ``mm`` / ``addmm``; for a
    batched call whose first operand is one matrix expanded over the batch (stride 0),
    ``A @ [B_1 ... B_S]``; None otherwise."""
    name = func.overloadpacket.__name__
    a, b = shapes[-2], shapes[-1]
    if name in ("mm", "addmm"):
        return a[0], a[1], b[1]
    if name in ("bmm", "baddbmm") and strides[-2][0] == 0:
        return a[1], a[2], b[0] * b[2]
    return None


def gemm_forms(func, shapes: tuple, strides: tuple) -> list[Callable[[], object]]:
    """The ways this machine offers to compute one recorded GEMM call, each on fresh operands of the
    call's shapes: as recorded (MKL); where the call is one 2-D GEMM (or a batch sharing its first
    operand, which is one), that GEMM through MKL and through oneDNN (on an AMD EPYC oneDNN ran W2's
    first layer 1.2-2.3x faster; ``mtlkit.models.cpu_gemm``); and a batch of a few large entries as
    one oneDNN call per entry, as mtlkit runs it there."""
    from mtlkit.models import cpu_gemm

    operands = [torch.randn(s) for s in shapes]
    forms = [lambda: func(*operands)]
    onednn = cpu_gemm._onednn_available()
    single = _single_gemm_shape(func, shapes, strides)
    batched = func.overloadpacket.__name__ in ("bmm", "baddbmm")
    # oneDNN forms where mtlkit would take them on an AVX-512 AMD CPU (its size and batch rules), whatever this
    # process's library.
    if single is not None:
        a, b = torch.randn(single[:2]), torch.randn(single[1:])
        if batched:
            forms.append(lambda: torch.mm(a, b))
        if onednn and cpu_gemm._fits_onednn(a, b):
            forms.append(lambda: cpu_gemm.onednn_matmul(a, b))
    elif batched and onednn:
        stacked_a, stacked_b = operands[-2:]
        entries = stacked_a.shape[0]
        if entries <= cpu_gemm._MAX_ONEDNN_BATCH and cpu_gemm._fits_onednn(stacked_a[0], stacked_b[0]):
            forms.append(lambda: [cpu_gemm.onednn_matmul(stacked_a[i], stacked_b[i]) for i in range(entries)])
    return forms


def fastest_gemm_forms(calls: list[tuple]) -> tuple[float, list[Callable[[], object]]]:
    """The step's GEMMs alone: each recorded call run in isolation at its real shape in each of its
    :func:`gemm_forms`, best of 3 x 20 runs. Returns the sum of the fastest forms' times (seconds a
    step, the GEMM-only bound at the host's fastest moment) and those forms, one per call."""
    total, chosen = 0.0, []
    for func, shapes, strides, *_ in calls:
        seconds, form = min(((_best_seconds(form, 20, rounds=3), form) for form in gemm_forms(func, shapes, strides)),
                            key=lambda timed: timed[0])
        total += seconds
        chosen.append(form)
    return total, chosen


def gemm_bound_window(forms: list[Callable[[], object]], samples_per_step: int, steps: int) -> Callable[[], float]:
    """The timer of one window of the GEMM-only bound, taken as the libraries' windows are: each form
    (:func:`fastest_gemm_forms`) run ``steps`` times in a row, as that function times it, and the
    window's samples/s for ``steps`` steps. ``benchmarks.run`` takes these windows between the
    libraries' own, so the bound and the trainer meet the host at the same moments."""

    def window() -> float:
        start = time.perf_counter()
        for form in forms:
            for _ in range(steps):
                form()
        return steps * samples_per_step / (time.perf_counter() - start)

    return window
