"""Do MMoE's gates keep unrelated tasks apart? Gate overlap against task correlation, on the MMoE
paper's synthetic generator.

Each (correlation, seed) draws one data set (20,000 rows, 10 % held out) and trains MMoE (8 experts
of [16]) on it for the same number of steps with Adam. Then, over the held-out rows, the table shows
(mean and min-max over seeds) the overlap of the two task gates' mean weights (1: the same experts in
the same proportions, 0: no expert in common), how many experts each gate uses (exp of the entropy
of its mean weights, 1 to 8), the row entropy (0: each row goes to one expert), how many experts get
a non-zero weight in a row, and the validation MSE of the two tasks:

    python examples/gate_usage_synthetic.py --seeds 3
    python examples/gate_usage_synthetic.py --seeds 3 --gate-dropout 0.1   # gates trained with dropout
    python examples/gate_usage_synthetic.py --seeds 3 --gate-top-k 2       # each gate mixes its 2 best experts
    python examples/gate_usage_synthetic.py --seeds 3 --gate-type dselect_k --gate-top-k 2   # DSelect-k gates
    python examples/gate_usage_synthetic.py --seeds 3 --gate-type dselect_k --gate-top-k 2 \
        --gate-conditioning task --gate-entropy-weight 0.1                   # static DSelect-k: 2 experts per task

About a minute on 2 cores with the defaults.
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import torch

from mtlkit.data import make_synthetic
from mtlkit.models import build_model
from mtlkit.reports.gate_usage import measure_gate_usage
from mtlkit.training import Trainer, TrainerConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--correlations", default="0,0.5,0.9,1")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--gate-dropout", type=float, default=0.0, help="the model's gate_dropout (training only)")
    parser.add_argument("--gate-top-k", type=int, default=None, help="the model's gate_top_k (default: every expert)")
    parser.add_argument("--gate-type", default="softmax", help="the model's gate_type: softmax or dselect_k")
    parser.add_argument("--gate-conditioning", default="example", help="the model's gate_conditioning: example or task")
    parser.add_argument("--gate-entropy-weight", type=float, default=0.0, help="the model's gate_entropy_weight (DSelect-k)")
    args = parser.parse_args()
    rows = []
    for correlation in (float(c) for c in args.correlations.split(",")):
        for seed in range(args.seeds):
            data = make_synthetic(correlation=correlation, num_rows=20_000, seed=seed)
            train, valid = data.to_tensors().split([0.9, 0.1], seed=seed)
            torch.manual_seed(seed)
            model = build_model("mmoe", input_dim=100, tasks=data.tasks, num_experts=8, expert_hidden=[16],
                                gate_dropout=args.gate_dropout, gate_top_k=args.gate_top_k, gate_type=args.gate_type,
                                gate_conditioning=args.gate_conditioning, gate_entropy_weight=args.gate_entropy_weight)
            config = TrainerConfig(max_steps=args.steps, max_epochs=None, batch_size=256, patience=None,
                                   eval_every=args.steps, progress=False, seed=seed)
            scores = Trainer(model, config).fit(train, valid).final("valid")
            usage = measure_gate_usage(model, (batch.inputs for batch in valid.batches(1024)))["gates"]
            rows.append({"correlation": correlation, "seed": seed, "overlap": usage.overlap()[0, 1],
                         "effective_experts": float(np.mean(usage.effective_experts)),
                         "row_entropy": float(np.mean(usage.row_entropy)),
                         "experts_per_row": float(np.mean(usage.experts_per_row)),
                         "mse": sum(s["mse"] for s in scores.values()) / len(scores)})
            print(rows[-1], flush=True)
    runs = pd.DataFrame(rows).groupby("correlation")
    columns = ("overlap", "effective_experts", "row_entropy", "experts_per_row", "mse")
    table = pd.DataFrame({column: runs[column].mean().map("{:.3f}".format) + " (" + runs[column].min().map("{:.3f}".format)
                          + "-" + runs[column].max().map("{:.3f}".format) + ")" for column in columns})
    print(table.to_string())

if __name__ == "__main__":
    main()
