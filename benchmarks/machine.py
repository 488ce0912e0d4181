"""This machine's roofline: the matmul peak, a model's FLOPs per sample and its GEMM-only bound."""

from __future__ import annotations

import time

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


def matmul_peak_gflops(m: int = 2048, k: int = 512, n: int = 2048) -> float:
    """fp32 GFLOP/s of a large square-ish matmul (the machine's practical peak)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    return 2 * m * k * n / _best_seconds(lambda: a @ b, 10) / 1e9


class _GemmRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in GEMMS:
            # Timed later as the plain overload on fresh operands, also when the model called the
            # ``out=`` one.
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            self.calls.append((func.overloadpacket.default, [tuple(t.shape) for t in tensors]))
        return func(*args, **(kwargs or {}))


def step_profile(step) -> tuple[float, list[tuple]]:
    """FLOPs of one training step (forward + backward) and the GEMM calls it makes."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    recorder = _GemmRecorder()
    with recorder:
        step()
    return counter.get_total_flops(), recorder.calls


def gemm_seconds(calls: list[tuple]) -> float:
    """Time of the step's GEMMs alone, each run in isolation at its real shape."""
    total = 0.0
    for func, shapes in calls:
        operands = [torch.randn(s) for s in shapes]
        total += _best_seconds(lambda: func(*operands), 20, rounds=3)
    return total
