"""What bringing a new batch into the step costs, against the suite's model-alone step.

The suite's "model alone" repeats the step on one fixed batch, whose rows stay in the core's cache.
A trainer must bring a new batch in every step. This script times, in one process and alternating,
the model step on a fixed batch, on prepared batches taken in turn, and on those with extra memory
traffic of the batch's size added to every step (a gather nothing reads, a sequential copy, a small
copy, an untouched allocation), then the batches of the trainer's own data path
(``MultiTaskTensors.batches``). The differences show how much of a
trainer's shortfall against "model alone" is the cost of touching the batch's bytes in the step:

    python -m benchmarks.data_path_cost --workload W1 --model shared_bottom
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.alternating import add_alternation_arguments, print_timings, time_alternating
from benchmarks.libraries import build_mtlkit
from benchmarks.workloads import WORKLOADS, make_data

VARIANTS = ("fixed batch", "prepared batches", "+ gather nobody reads", "+ sequential copy of a batch",
            "+ copy of 1/8 batch", "+ untouched allocation", "trainer's batches")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="W1")
    parser.add_argument("--model", default="shared_bottom")
    parser.add_argument("--batches", type=int, default=8, help="rows = batch size x this")
    add_alternation_arguments(parser, steps=1000)
    args = parser.parse_args()
    from mtlkit.data.tensors import Batch
    from mtlkit.files import write_json
    from mtlkit.objectives import FixedWeighting, task_losses
    from mtlkit.training.optimizer import build_adam

    workload = WORKLOADS[args.workload]
    size = workload.batch_size
    model, tasks, dataset = build_mtlkit(workload, args.model, make_data(workload, size * args.batches))
    if not isinstance(dataset.inputs, torch.Tensor):
        parser.error(f"{args.workload} has named inputs; this script gathers one float block (use W1)")
    weighting = FixedWeighting(tasks)
    _, zero_grad, optimizer_step = build_adam(list(model.parameters()), 1e-3, 0.0, torch.device("cpu"))
    prepared = list(dataset.batches(size, shuffle=True, generator=torch.Generator().manual_seed(0)))
    rows = dataset.inputs
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(1))
    indices = [order[i * size:(i + 1) * size] for i in range(args.batches)]

    def trainer_batches():  # the trainer's data path: epoch after epoch of shuffled batches
        generator = torch.Generator().manual_seed(2)
        while True:
            yield from dataset.batches(size, shuffle=True, generator=generator)

    from_trainer = trainer_batches()

    def step(batch: Batch) -> None:
        losses = task_losses(model(batch.inputs), batch.labels, batch.label_mask, tasks, all_labelled=True)
        loss, _ = weighting(losses)
        zero_grad()
        loss.backward()
        optimizer_step()

    def run(variant: str, steps: int) -> float:
        start = time.perf_counter()
        for i in range(steps):
            j = i % args.batches
            if variant == "fixed batch":
                step(prepared[0])
                continue
            if variant == "+ gather nobody reads":
                rows.index_select(0, indices[j])
            elif variant == "+ sequential copy of a batch":
                rows[:size].clone()
            elif variant == "+ copy of 1/8 batch":
                rows[:size // 8].clone()
            elif variant == "+ untouched allocation":
                torch.empty_like(rows[:size])
            if variant == "trainer's batches":
                step(next(from_trainer))
            else:
                step(prepared[j])
        return (time.perf_counter() - start) / steps

    seconds = time_alternating(run, VARIANTS, args.rounds, args.steps)
    batch_kb = rows[:size].numel() * rows.element_size() / 1024
    print(f"{args.workload} {args.model}: batch {size} rows ({batch_kb:,.0f} KB), dataset {len(dataset):,} rows, "
          f"{args.rounds} x {args.steps} steps each, alternating")
    print_timings(seconds, "fixed batch", "vs fixed")
    if args.out is not None:
        write_json(args.out, {"workload": args.workload, "model": args.model, "batch_size": size,
                              "rows": len(dataset), "steps": args.steps, "seconds": seconds})


if __name__ == "__main__":
    main()
