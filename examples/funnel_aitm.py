"""AITM and the entire-space funnel against the other models on a synthetic conversion funnel
(click -> cart -> purchase).

Each seed draws one funnel (``mtlkit.data.make_funnel``: 200,000 rows, step rates 0.2, 0.3, 0.3, so
about 3 % of impressions end in a purchase; 80/10/10 split). Every model trains with Adam, early
stopping on the validation AUC averaged over the steps. The table shows each step's test AUC (mean
+- std over seeds), the AUC of the true probabilities (the best any model can do), and how often a
model predicts a later step likelier than the one it needs (the share of test rows with some
``p_t > p_{t-1}``; AITM's calibrator penalises exactly that). A second table gives each AUC's gap to
the true probabilities' AUC on the same seed, since seeds draw funnels of different difficulty:

    python examples/funnel_aitm.py --seeds 5

About three minutes for 5 seeds on 2 cores (the models' training took 160 s of it).
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from mtlkit.data import make_funnel
from mtlkit.models import build_model
from mtlkit.training import Trainer, TrainerConfig

STEPS, RATES = ("click", "cart", "purchase"), (0.2, 0.3, 0.3)
# Networks of about the same size: AITM's per-step networks as in the public PyTorch port.
MODELS = {
    "single_task": ("single_task", {"bottom_hidden": [128, 64, 32], "tower_hidden": []}),
    "shared_bottom": ("shared_bottom", {"bottom_hidden": [128, 64, 32], "tower_hidden": [16]}),
    "mmoe": ("mmoe", {"num_experts": 6, "expert_hidden": [64, 32], "tower_hidden": [16]}),
    "ple": ("ple", {"num_shared_experts": 2, "num_task_experts": 1, "expert_hidden": [64, 32], "tower_hidden": [16]}),
    "esmm_funnel": ("esmm_funnel", {"tower_hidden": [128, 64, 32]}),
    "aitm (no calibrator)": ("aitm", {"calibration_weight": 0.0}),
    "aitm": ("aitm", {}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    rows = []
    for seed in range(args.seeds):
        data = make_funnel(STEPS, RATES, num_rows=args.rows, seed=seed)
        train, valid, test = data.split([0.8, 0.1, 0.1], seed=seed)
        labels, truth = test.labels.numpy(), test.probabilities
        rows.append({"seed": seed, "model": "true probabilities", "violations": 0.0,
                     **{step: roc_auc_score(labels[:, t], truth[:, t]) for t, step in enumerate(STEPS)}})
        for label, (name, options) in MODELS.items():
            torch.manual_seed(seed)
            model = build_model(name, input_dim=data.inputs.shape[1], tasks=data.tasks, **options)
            config = TrainerConfig(max_epochs=args.epochs, batch_size=1024, patience=2, monitor="mean/auc",
                                   learning_rate=1e-3, progress=False, seed=seed)
            started = time.perf_counter()
            Trainer(model, config).fit(train.to_tensors(), valid.to_tensors())
            predicted = torch.stack(list(model.predict(test.inputs).values()), dim=1)
            rows.append({"seed": seed, "model": label, "seconds": time.perf_counter() - started,
                         "violations": float((predicted[:, 1:] > predicted[:, :-1]).any(dim=1).float().mean()),
                         **{step: roc_auc_score(labels[:, t], predicted[:, t].numpy()) for t, step in enumerate(STEPS)}})
            print(rows[-1], flush=True)
    runs = pd.DataFrame(rows)
    table = runs.groupby("model", sort=False)[[*STEPS, "violations"]].agg(["mean", "std"])
    print(f"\ntest AUC per step and share of rows predicted against the funnel, {args.seeds} seeds")
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    # Seeds draw different funnels, some easier than others: each AUC is also shown as its gap to
    # the true probabilities' AUC on the same seed (0 is the best possible), paired seed by seed.
    truth = runs[runs.model == "true probabilities"].set_index("seed")[list(STEPS)]
    gaps = runs[runs.model != "true probabilities"].set_index("seed")
    gaps[list(STEPS)] = gaps[list(STEPS)] - truth
    print("\nAUC minus the true probabilities' AUC (paired by seed)")
    print(gaps.groupby("model", sort=False)[list(STEPS)].agg(["mean", "std", "min", "max"])
          .to_string(float_format=lambda v: f"{v:+.4f}"))


if __name__ == "__main__":
    main()
