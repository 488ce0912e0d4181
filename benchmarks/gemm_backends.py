"""Each GEMM of a training step through MKL (what ``torch.mm`` / ``torch.bmm`` run on the CPU) and through oneDNN.

torch's CPU wheel carries two fp32 GEMM libraries. Its ``mm``, ``addmm``, ``bmm`` and ``baddbmm`` call
MKL; oneDNN, the other, is reachable through ``torch.ops.mkldnn._linear_pointwise`` (what inductor's
CPU code calls for a linear layer). Which one is faster depends on the CPU: on the Xeon hosts of the
earlier rounds oneDNN ran W2's first layer at 90-95 % of MKL's speed, while on an AMD EPYC with
AVX-512 it ran the same GEMM 1.3x faster than MKL. This script records the GEMMs of one training step
(shapes and strides as the step runs them), times each on fresh operands of those strides through
both libraries, and prints which is faster for each, the total of each, and the total if each GEMM
took the faster one: how much a per-shape choice of library could save on this machine.

    python -m benchmarks.gemm_backends --workload W2 --model mmoe --out gemm_backends.json

oneDNN takes one weight per call, so a batched GEMM runs as one call per batch entry, its outputs left
as separate tensors (placing them into one would add a copy). The step itself is not changed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.libraries import build_mtlkit
from benchmarks.machine import GemmRecorder, _best_seconds, matmul_peaks_gflops
from benchmarks.workloads import WORKLOADS, make_data
from mtlkit.models import cpu_gemm


# A oneDNN call this many times slower than MKL's is timed once, not in rounds.
SLOW_PATH = 20


def onednn_version(func, operands: list[torch.Tensor]):
    """The recorded aten GEMM ``func`` on ``operands`` as oneDNN calls (a bias term dropped from the
    ``addmm`` / ``baddbmm`` forms: the GEMM alone), or None where there is no fair call: a form it
    has none for, a batch of more entries than mtlkit sends to oneDNN one by one (the mixing's small
    product per row), or entries whose second operand is sliced out of wider rows, which sends oneDNN
    to a path 1,000 times slower (the first-layer weight gradient's per-stack form;
    ``mtlkit.models.cpu_gemm``)."""
    name = func.overloadpacket.__name__
    a, b = operands[-2:]
    if name in ("mm", "addmm"):
        return lambda: cpu_gemm.onednn_matmul(a, b)
    if name in ("bmm", "baddbmm"):
        if a.shape[0] > cpu_gemm._MAX_ONEDNN_BATCH or not cpu_gemm._readable(b[0], first=False):
            return None
        return lambda: [cpu_gemm.onednn_matmul(a[i], b[i]) for i in range(a.shape[0])]
    return None


def _operand(shape: tuple[int, ...], stride: tuple[int, ...]) -> torch.Tensor:
    """A fresh tensor of ``shape`` laid out with ``stride`` (a transposed or expanded view as in the step)."""
    extent = 1 + sum((size - 1) * step for size, step in zip(shape, stride) if size > 0)
    return torch.randn(max(extent, 1)).as_strided(shape, stride)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="W2")
    parser.add_argument("--model", default="mmoe")
    parser.add_argument("--batch-size", type=int, default=None, help="rows a step (default: the workload's)")
    parser.add_argument("--repeats", type=int, default=5, help="calls per timing round (best of 3 rounds)")
    parser.add_argument("--out", default=None, help="write the table as JSON here")
    args = parser.parse_args(argv)
    if not cpu_gemm._onednn_available():
        raise SystemExit("this torch build has no oneDNN linear (torch.ops.mkldnn._linear_pointwise)")
    from mtlkit.objectives import FixedWeighting, task_losses
    from mtlkit.training.memory import keep_freed_memory

    keep_freed_memory()
    workload = WORKLOADS[args.workload]
    batch_size = args.batch_size or workload.batch_size
    model, tasks, dataset = build_mtlkit(workload, args.model, make_data(workload, batch_size))
    batch = dataset.subset(slice(0, batch_size))
    weighting = FixedWeighting(tasks)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        weighting(task_losses(model(batch.inputs), batch.labels, batch.label_mask, tasks))[0].backward()

    step()
    recorder = GemmRecorder()
    with recorder, cpu_gemm.forced_cpu_gemm_library("mkl"):  # aten's GEMMs, as the step's forms run them through MKL
        step()
    calls: dict[tuple, int] = {}
    for func, shapes, strides, _ in recorder.calls:
        calls[(func, shapes, strides)] = calls.get((func, shapes, strides), 0) + 1

    peaks = matmul_peaks_gflops()
    rows = []
    for (func, shapes, strides), count in calls.items():
        operands = [_operand(s, st) for s, st in zip(shapes, strides)]
        mkl = _best_seconds(lambda: func(*operands), args.repeats, rounds=3) * count
        version = onednn_version(func, operands)
        onednn = None
        if version is not None:
            # Some strided operands send oneDNN to a slow path (W2 PLE's upper-level weight gradients: 4 s
            # against MKL's 5 ms): one call is measure enough there.
            version()
            started = time.perf_counter()
            version()
            once = time.perf_counter() - started
            onednn = (once if once > SLOW_PATH * mkl / count else _best_seconds(version, args.repeats, rounds=3)) * count
        rows.append({"op": func.name().split("::")[-1], "shapes": [list(s) for s in shapes],
                     "strides": [list(s) for s in strides], "calls": count, "mkl_ms": 1e3 * mkl,
                     "onednn_ms": None if onednn is None else 1e3 * onednn})
    rows.sort(key=lambda r: -r["mkl_ms"])
    mkl_total = sum(r["mkl_ms"] for r in rows)
    best_total = sum(min(r["mkl_ms"], r["onednn_ms"] if r["onednn_ms"] is not None else r["mkl_ms"]) for r in rows)
    onednn_total = sum(r["onednn_ms"] if r["onednn_ms"] is not None else r["mkl_ms"] for r in rows)

    print(f"fp32 matmul peak [2048x512]@[512x2048]: MKL {peaks['mkl']:.1f} GFLOP/s, oneDNN {peaks['onednn']:.1f} GFLOP/s")
    print(f"{'GEMM':<10} {'shapes':<48} {'calls':>5} {'MKL ms':>8} {'oneDNN ms':>9} {'faster':>7}")
    for r in rows:
        faster = "-" if r["onednn_ms"] is None else ("oneDNN" if r["onednn_ms"] < r["mkl_ms"] else "MKL")
        onednn_cell = "-" if r["onednn_ms"] is None else f"{r['onednn_ms']:.3f}"
        print(f"{r['op']:<10} {str(r['shapes']):<48} {r['calls']:>5} {r['mkl_ms']:>8.3f} {onednn_cell:>9} {faster:>7}")
    print(f"GEMMs of one step: MKL {mkl_total:.2f} ms, oneDNN {onednn_total:.2f} ms, the faster of the two for each "
          f"{best_total:.2f} ms ({100 * (1 - best_total / mkl_total):.1f} % less than MKL alone)")
    report = {"workload": args.workload, "model": args.model, "batch_size": batch_size, "peak_gflops": peaks,
              "gemms": rows, "mkl_ms": mkl_total, "onednn_ms": onednn_total, "faster_of_two_ms": best_total}
    if args.out:
        out = Path(args.out)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(out)
    return report


if __name__ == "__main__":
    main()
