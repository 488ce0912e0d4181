"""How long each GEMM of a training step takes inside the step, against the same GEMM alone.

The GEMM-only bound of ``benchmarks.run`` times every GEMM of a step in isolation, on fresh
contiguous operands that stay in cache between repetitions. Inside a real step the same GEMMs read
activations written long before (or strided views of them) and run slower; this script shows by how
much, GEMM by GEMM, so the share of the bound that eager execution can reach is measured, not
guessed. Where oneDNN runs the large GEMMs (``mtlkit.models.cpu_gemm``, AMD CPUs with AVX-512) its linear calls
are listed as ``_linear_pointwise``, each with the copy it makes of a strided first operand:

    python -m benchmarks.gemm_in_step --workload W2 --model mmoe
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch

from benchmarks.libraries import build_mtlkit
from benchmarks.machine import GemmRecorder, _best_seconds
from benchmarks.workloads import WORKLOADS, make_data


def gemm_alone(func, shapes: tuple) -> Callable[[], torch.Tensor]:
    """The recorded GEMM call on fresh contiguous operands of its shapes; oneDNN's linear as
    ``mtlkit.models.cpu_gemm`` calls it, ``[M, K] @ [K, N]`` with the weight ``[N, K]`` its transpose."""
    from mtlkit.models.cpu_gemm import onednn_matmul

    operands = [torch.randn(s) for s in shapes]
    if func.overloadpacket is torch.ops.mkldnn._linear_pointwise:
        a, weight = operands[:2]
        b = weight.t().contiguous()
        return lambda: onednn_matmul(a, b)
    return lambda: func(*operands)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="W2")
    parser.add_argument("--model", default="mmoe")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    from mtlkit.objectives import FixedWeighting, task_losses
    from mtlkit.training.memory import keep_freed_memory
    from mtlkit.training.optimizer import build_adam

    keep_freed_memory()  # as the trainer does: otherwise large outputs page-fault inside their GEMMs

    workload = WORKLOADS[args.workload]
    model, tasks, dataset = build_mtlkit(workload, args.model, make_data(workload, workload.batch_size))
    batch = dataset.subset(slice(0, workload.batch_size))
    weighting = FixedWeighting(tasks)
    _, zero_grad, optimizer_step = build_adam(list(model.parameters()), 1e-3, 0.0, torch.device("cpu"))  # as the trainer's

    def step() -> None:
        loss, _ = weighting(task_losses(model(batch.inputs), batch.labels, batch.label_mask, tasks))
        zero_grad()
        loss.backward()
        optimizer_step()

    for _ in range(3):
        step()
    step_seconds = _best_seconds(step, args.steps, rounds=3)
    recorder = GemmRecorder(with_onednn=True)
    with recorder:
        for _ in range(args.steps):
            step()
    seconds_by_call: dict[tuple, list[float]] = {}
    for func, shapes, strides, seconds in recorder.calls:
        seconds_by_call.setdefault((func, shapes, strides), []).append(seconds)
    in_step_total = isolated_total = 0.0
    # A shape can occur several times per step (one per layer or level): each call counts.
    print(f"{'GEMM':<17} {'shapes':<52} {'calls':>5} {'in step ms':>10} {'alone ms':>9}")
    for (func, shapes, _), seconds in sorted(seconds_by_call.items(), key=lambda kv: -sum(kv[1])):
        calls_per_step = len(seconds) // args.steps
        in_step = sorted(seconds)[len(seconds) // 2] * calls_per_step
        alone = _best_seconds(gemm_alone(func, shapes), 10, rounds=3) * calls_per_step
        in_step_total += in_step
        isolated_total += alone
        print(f"{func.name().split('::')[-1]:<17} {str(list(shapes)):<52} {calls_per_step:>5} "
              f"{1e3 * in_step:>10.3f} {1e3 * alone:>9.3f}")
    print(f"GEMMs per step: {1e3 * in_step_total:.2f} ms in the step, {1e3 * isolated_total:.2f} ms alone "
          f"(the GEMM-only bound); whole step {1e3 * step_seconds:.2f} ms.")
    print(f"The GEMMs alone, as run in the step, are {100 * isolated_total / in_step_total:.0f} % of the bound; "
          f"the step is {100 * isolated_total / step_seconds:.0f} %.")


if __name__ == "__main__":
    main()
