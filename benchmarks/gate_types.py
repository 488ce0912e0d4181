"""What each gate type costs a training step, through mtlkit's own trainer.

Softmax gates of the small mixtures, top-k and gate dropout included, run inside one autograd node
(``models/small_mixture.py``), and so do DSelect-k gates (their penalty computed there too) and
gates conditioned on the task alone. This script trains the same model (W1's MMoE by default) with
each gate type, the trainer's data path included, alternating variant by variant in one process so
that the machine's drift spreads over all of them, and prints each one's time per step and its
share of softmax's speed:

    python -m benchmarks.gate_types --model mmoe --steps 200 --rounds 5
"""

from __future__ import annotations

import argparse

from benchmarks.alternating import add_alternation_arguments, print_timings, time_alternating
from benchmarks.libraries import build_mtlkit, trainer_rates
from benchmarks.workloads import WORKLOADS, make_data

VARIANTS = {
    "softmax": {},
    "softmax, top 2": {"gate_top_k": 2},
    "softmax, dropout 0.1": {"gate_dropout": 0.1},
    "dselect-k, k 2": {"gate_type": "dselect_k", "gate_top_k": 2},
    "dselect-k, k 2, entropy 0.01": {"gate_type": "dselect_k", "gate_top_k": 2, "gate_entropy_weight": 0.01},
    "dselect-k, k 2, task": {"gate_type": "dselect_k", "gate_top_k": 2, "gate_conditioning": "task"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="W1", choices=sorted(WORKLOADS))
    parser.add_argument("--model", default="mmoe", help="a gated model: omoe, mmoe, cgc, ple")
    add_alternation_arguments(parser, steps=200, steps_help="trainer steps per timing")
    args = parser.parse_args()
    from mtlkit.files import write_json

    workload = WORKLOADS[args.workload]
    size = workload.batch_size
    data = make_data(workload, size * 8)
    built = {name: build_mtlkit(workload, args.model, data, **options) for name, options in VARIANTS.items()}

    def run(variant: str, steps: int) -> float:
        model, _, dataset = built[variant]
        _, rates = trainer_rates(model, dataset, size, windows=1, steps=steps, warmup=10)
        return size / rates[0]

    seconds = time_alternating(run, list(VARIANTS), args.rounds, args.steps)
    print(f"{args.workload} {args.model}: batch {size}, {args.rounds} x {args.steps} trainer steps each, alternating")
    print_timings(seconds, "softmax", "vs softmax")
    if args.out is not None:
        write_json(args.out, {"workload": args.workload, "model": args.model, "batch_size": size, "steps": args.steps,
                              "variants": VARIANTS, "seconds": seconds})


if __name__ == "__main__":
    main()
