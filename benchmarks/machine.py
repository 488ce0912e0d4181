"""This machine's roofline: the matmul peak, a model's FLOPs per sample and its GEMM-only bound."""

from __future__ import annotations

import platform
import time
from pathlib import Path
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


def matmul_peak_gflops(m: int = 2048, k: int = 512, n: int = 2048, device: str = "cpu") -> float:
    """fp32 GFLOP/s of a large square-ish matmul (the machine's practical peak) on ``device``."""
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
    re-timed on fresh operands; ``seconds`` is the call's own time where it ran.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket not in GEMMS:
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
    rows are work the code executes, not work the model needs. The GEMM calls are the executed ones.
    """
    from mtlkit.models import gates

    counter = FlopCounterMode(display=False)
    with counter, mock.patch.object(gates, "_PAD_MIXING_FROM", float("inf")):
        step()
    recorder = GemmRecorder()
    with recorder:
        step()
    return counter.get_total_flops(), recorder.calls


def gemm_seconds(calls: list[tuple]) -> float:
    """Time of the step's GEMMs alone, each run in isolation at its real shape."""
    total = 0.0
    for func, shapes, *_ in calls:
        operands = [torch.randn(s) for s in shapes]
        total += _best_seconds(lambda: func(*operands), 20, rounds=3)
    return total
