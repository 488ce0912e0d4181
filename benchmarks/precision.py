"""Training throughput in fp32 and in bf16 (``training.precision``) through mtlkit's trainer.

    python -m benchmarks.precision --workloads W1,W2 --models mmoe --repeats 2 --out runs/precision.json

Each (workload, model, precision) trains ``--steps`` steps on a fresh model; the rate is taken over
the steps after the first third (warm-up). Precisions alternate, fp32 first, ``--repeats`` times,
so drift of a shared machine shows as spread rather than as a difference.
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from benchmarks.libraries import build_mtlkit, trainer_rates
from benchmarks.workloads import WORKLOADS, make_data
from mtlkit.files import write_json


def measure(workload_name: str, model_name: str, precision: str, steps: int, device: str) -> float:
    """Training samples per second after warm-up (the first third of the steps)."""
    workload = WORKLOADS[workload_name]
    model, _, dataset = build_mtlkit(workload, model_name, make_data(workload, rows=workload.batch_size * steps))
    warmup = steps // 3
    _, rates = trainer_rates(model, dataset, workload.batch_size, 1, steps - warmup, warmup, device, precision=precision)
    return rates[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="W1,W2")
    parser.add_argument("--models", default="mmoe")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="runs/precision.json", help="the JSON file (default under runs/, which git ignores)")
    args = parser.parse_args()
    results = []
    for workload in args.workloads.split(","):
        for model in args.models.split(","):
            rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
            for _ in range(args.repeats):
                for precision in rates:
                    rates[precision].append(measure(workload, model, precision, args.steps, args.device))
            results.append({"workload": workload, "model": model, "device": args.device, "samples_per_s": rates,
                            "bf16_over_fp32": min(rates["bf16"]) / max(rates["fp32"]),
                            "bf16_over_fp32_best": max(rates["bf16"]) / min(rates["fp32"])})
    table = Table(title=f"training samples/s by precision ({args.device})")
    for column in ("workload", "model", "fp32", "bf16", "bf16 / fp32"):
        table.add_column(column)
    for r in results:
        fp32, bf16 = r["samples_per_s"]["fp32"], r["samples_per_s"]["bf16"]
        table.add_row(r["workload"], r["model"], ", ".join(f"{v:,.0f}" for v in fp32), ", ".join(f"{v:,.0f}" for v in bf16),
                      f"{r['bf16_over_fp32']:.2f}-{r['bf16_over_fp32_best']:.2f}x")
    Console().print(table)
    write_json(args.out, results)


if __name__ == "__main__":
    main()
