"""Where the time of one training step goes: a torch.profiler table of mtlkit's trainer on a workload.

    python -m benchmarks.profile_step --workload W1 --model mmoe --steps 200
    python -m benchmarks.profile_step --workload W2 --model mmoe --steps 50 --shapes   # which tensors each operator touches
"""

from __future__ import annotations

import argparse
import time

from torch.profiler import ProfilerActivity, profile

from benchmarks.libraries import build_mtlkit
from benchmarks.workloads import WORKLOADS, make_data


def samples_seen(rows: int, batch_size: int, steps: int) -> int:
    """Samples that ``steps`` trainer steps read from a table of ``rows``: the trainer keeps each
    epoch's last, partial batch, and a table smaller than a batch makes every batch that small."""
    full, rest = divmod(rows, batch_size)
    epoch = [batch_size] * full + ([rest] if rest else [])
    return sum(epoch[i % len(epoch)] for i in range(steps))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", default="W1")
    parser.add_argument("--model", default="mmoe")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rows", type=int, default=None,
                        help="rows of the workload's table (default: batch size x steps); fewer rows than a "
                             "batch make every batch that small")
    parser.add_argument("--shapes", action="store_true",
                        help="one row per operator and input shapes: which tensors each operator touches. Not for "
                             "times: recording shapes made W2's GEMMs that write into an out= view 3-6x slower")
    args = parser.parse_args()
    from mtlkit.training import Trainer, TrainerConfig

    workload = WORKLOADS[args.workload]
    rows = args.rows or workload.batch_size * args.steps
    data = make_data(workload, rows)
    samples = samples_seen(rows, workload.batch_size, args.steps)
    model, tasks, dataset = build_mtlkit(workload, args.model, data)
    config = TrainerConfig(batch_size=workload.batch_size, max_steps=args.steps, max_epochs=None, eval_every=args.steps,
                           patience=None, progress=False)
    Trainer(model, config).fit(dataset)  # warm-up
    start = time.perf_counter()
    Trainer(model, config).fit(dataset)
    seconds = time.perf_counter() - start
    print(f"{args.workload} {args.model}: {samples / seconds:,.0f} samples/s through the trainer, "
          f"{1e3 * seconds / args.steps:.3f} ms/step ({samples / args.steps:,.0f} rows a step on average)")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
        Trainer(model, config).fit(dataset)
    print(prof.key_averages(group_by_input_shape=args.shapes).table(
        sort_by="self_cpu_time_total", row_limit=40 if args.shapes else 25, max_name_column_width=36, max_shapes_column_width=80))


if __name__ == "__main__":
    main()
