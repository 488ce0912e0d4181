"""Does gradient surgery help where tasks are unrelated? Shared-Bottom and MMoE, with and without
PCGrad (or MGDA, CAGrad, Aligned-MTL, IMTL-G, Nash-MTL, FairGrad, UPGrad, GradVac, DB-MTL, MoCo), on the MMoE paper's
synthetic generator at several task correlations.

Each (correlation, seed) draws one data set (20,000 rows, 10 % held out); every model trains on it
for the same number of steps with Adam. The table shows, per correlation, model and surgery, the two
tasks' mean validation MSE (lower is better) averaged over seeds without and with the surgery, its
MSE over the plain one's seed by seed (mean, min, max; the data's scale differs between seeds), and
how much longer it trains:

    python examples/pcgrad_synthetic.py --seeds 3
    python examples/pcgrad_synthetic.py --seeds 3 --surgeries pcgrad,mgda,cagrad,aligned_mtl,imtl,nash_mtl,upgrad,gradvac
    python examples/pcgrad_synthetic.py --seeds 3 --surgeries pcgrad,mgda --scope shared
    python examples/pcgrad_synthetic.py --seeds 3 --surgeries db_mtl,moco --scope shared_fixed
    python examples/pcgrad_synthetic.py --seeds 3 --surgeries gradvac --options '{"per_layer": true}'

About a minute on 2 cores with the defaults.
"""

from __future__ import annotations

import argparse
import json
import time

import pandas as pd
import torch

from mtlkit.data import make_synthetic
from mtlkit.models import build_model
from mtlkit.training import Trainer, TrainerConfig
from mtlkit.training.trainer import GRADIENT_SURGERY_SCOPES

MODELS = {"shared_bottom": {"bottom_hidden": [64]}, "mmoe": {"num_experts": 8, "expert_hidden": [16]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--correlations", default="0,0.5,0.9")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--surgeries", default="pcgrad", help="comma-separated gradient surgeries to compare with none")
    parser.add_argument("--scope", default="all", choices=list(GRADIENT_SURGERY_SCOPES),
                        help="training.gradient_surgery_scope: every parameter, only the coordinates tasks share this "
                             "step, or those they shared in the first step")
    parser.add_argument("--options", default="{}", help="training.gradient_surgery_options for every surgery, as JSON")
    args = parser.parse_args()
    options = json.loads(args.options)
    rows = []
    for correlation in (float(c) for c in args.correlations.split(",")):
        for seed in range(args.seeds):
            data = make_synthetic(correlation=correlation, num_rows=20_000, seed=seed)
            train, valid = data.to_tensors().split([0.9, 0.1], seed=seed)
            for name, model_options in MODELS.items():
                for surgery in [None, *args.surgeries.split(",")]:
                    torch.manual_seed(seed)
                    model = build_model(name, input_dim=100, tasks=data.tasks, **model_options)
                    config = TrainerConfig(max_steps=args.steps, max_epochs=None, batch_size=256, patience=None,
                                           eval_every=args.steps, progress=False, gradient_surgery=surgery, seed=seed,
                                           gradient_surgery_options=options if surgery else {},
                                           gradient_surgery_scope=args.scope if surgery else "all")
                    started = time.perf_counter()
                    scores = Trainer(model, config).fit(train, valid).final("valid")
                    rows.append({"correlation": correlation, "seed": seed, "model": name, "surgery": surgery or "none",
                                 "mse": sum(s["mse"] for s in scores.values()) / len(scores),
                                 "seconds": time.perf_counter() - started})
                    print(rows[-1], flush=True)
    runs = pd.DataFrame(rows)
    keys = ["correlation", "model", "seed"]
    plain = runs[runs.surgery == "none"][[*keys, "mse", "seconds"]]
    paired = runs[runs.surgery != "none"].merge(plain, on=keys, suffixes=("", "_plain"))
    # The data's scale differs from seed to seed, so a surgery is judged seed by seed: its MSE over the plain one's.
    paired["ratio"] = paired.mse / paired.mse_plain
    paired["time_ratio"] = paired.seconds / paired.seconds_plain
    table = paired.groupby(["correlation", "model", "surgery"]).agg(
        mse_plain=("mse_plain", "mean"), mse_surgery=("mse", "mean"), ratio_mean=("ratio", "mean"),
        ratio_min=("ratio", "min"), ratio_max=("ratio", "max"), time_ratio=("time_ratio", "mean"))
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    main()
