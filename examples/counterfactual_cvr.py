"""ESCM2 (IPS and DR) against ESMM and a CVR model trained on clicks alone, on a synthetic funnel where
the post-click conversion rate is known for every impression, clicked or not.

Each seed draws one funnel (``mtlkit.data.make_funnel``: click -> purchase, 200,000 rows, 80/10/10
split). Clicks and purchases have related weight vectors (``--relatedness``), so the clicked rows
are a biased sample of the impressions: the sample-selection bias ESMM and ESCM2 address. Every
model has the same CTR and CVR networks (``--towers``) and trains with Adam, early stopping on the
validation AUC averaged over the tasks. On the test rows the table shows:

- ``cvr_auc_clicked``: the CVR AUC on clicked rows against their purchases (what the papers report);
- ``cvr_auc_all``: the CVR AUC on all impressions against the conversion each would have had if
  clicked (drawn from the true conditional rate; the entire space a CVR model serves);
- ``cvr_bias``: the mean predicted CVR over all impressions minus the mean true one (ESCM2's
  "inherent estimation bias" of ESMM is a positive one), and ``cvr_abs_bias`` its size;
- ``ctcvr_auc``: the AUC of pCTR x pCVR against purchases on all impressions.

A second table pairs each model with ESMM seed by seed. The README's two tables::

    python examples/counterfactual_cvr.py --seeds 5 --rows 1000000
    python examples/counterfactual_cvr.py --seeds 5 --rows 1000000 --towers 16 --rates 0.05,0.2

"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from mtlkit.data import MultiTaskTensors, make_funnel
from mtlkit.models import build_model, esmm_tasks
from mtlkit.tasks import TaskSpec
from mtlkit.training import Trainer, TrainerConfig


def models(towers: list[int]) -> dict[str, tuple[str, dict]]:
    """CTR and CVR networks of the same size in every model; "cvr on clicks" is the naive baseline
    that fits the CVR network to clicked rows only (ESMM's "BASE")."""
    return {
        "cvr on clicks": ("single_task", {"bottom_hidden": towers, "tower_hidden": []}),
        "esmm": ("esmm", {"tower_hidden": towers}),
        "escm2 (weight 0.1)": ("escm2", {"tower_hidden": towers, "counterfactual_weight": 0.1}),
        "escm2 (weight 1)": ("escm2", {"tower_hidden": towers, "counterfactual_weight": 1.0}),
        "escm2-dr (weight 0.1)": ("escm2", {"tower_hidden": towers, "counterfactual_weight": 0.1, "counterfactual_mode": "dr"}),
        "escm2-dr (weight 1)": ("escm2", {"tower_hidden": towers, "counterfactual_weight": 1.0, "counterfactual_mode": "dr"}),
    }


METRICS = ["cvr_auc_clicked", "cvr_auc_all", "cvr_bias", "cvr_abs_bias", "ctcvr_auc"]
LOWER_IS_BETTER = {"cvr_abs_bias"}


def _tensors(inputs: torch.Tensor, labels: torch.Tensor, tasks: list[TaskSpec]) -> MultiTaskTensors:
    """ESMM's columns: click, purchase after a click (missing without one), purchase (the naive
    model has no third)."""
    click, purchase = labels[:, 0], labels[:, 1]
    columns = [click, torch.where(click > 0, purchase, torch.nan), purchase][:len(tasks)]
    return MultiTaskTensors(inputs, torch.stack(columns, dim=1), [t.name for t in tasks])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--relatedness", type=float, default=0.5)
    parser.add_argument("--rates", default="0.1,0.2", help="mean click rate, mean conversion rate after a click")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--towers", default="128,64,32", help="hidden widths of each CTR and CVR network")
    args = parser.parse_args()
    towers = [int(w) for w in args.towers.split(",") if w]
    rates = tuple(float(r) for r in args.rates.split(","))
    rows = []
    for seed in range(args.seeds):
        data = make_funnel(("click", "purchase"), rates, relatedness=args.relatedness, num_rows=args.rows, seed=seed)
        train, valid, test = data.split([0.8, 0.1, 0.1], seed=seed)
        true_cvr = test.probabilities[:, 1] / test.probabilities[:, 0]
        # What each test impression would have done if clicked: the entire space's CVR labels.
        would_convert = np.random.default_rng(seed + 1000).random(len(true_cvr)) < true_cvr
        clicked = test.labels[:, 0].numpy() > 0
        purchase = test.labels[:, 1].numpy()

        def scores(label: str, cvr: np.ndarray, ctcvr: np.ndarray, seconds: float = 0.0) -> dict:
            bias = float(cvr.mean() - true_cvr.mean())
            return {"seed": seed, "model": label, "seconds": seconds,
                    "cvr_auc_clicked": roc_auc_score(purchase[clicked], cvr[clicked]),
                    "cvr_auc_all": roc_auc_score(would_convert, cvr),
                    "cvr_bias": bias, "cvr_abs_bias": abs(bias),
                    "ctcvr_auc": roc_auc_score(purchase, ctcvr)}

        rows.append(scores("true probabilities", true_cvr, test.probabilities[:, 1]))
        for label, (name, options) in models(towers).items():
            torch.manual_seed(seed)
            tasks = esmm_tasks() if name != "single_task" else [TaskSpec("ctr"), TaskSpec("cvr")]
            model = build_model(name, input_dim=data.inputs.shape[1], tasks=tasks, **options)
            config = TrainerConfig(max_epochs=args.epochs, batch_size=1024, patience=2, monitor="mean/auc",
                                   learning_rate=1e-3, progress=False, seed=seed)
            started = time.perf_counter()
            Trainer(model, config).fit(_tensors(train.inputs, train.labels, tasks), _tensors(valid.inputs, valid.labels, tasks))
            predicted = model.predict(test.inputs)
            cvr = predicted["cvr"].squeeze(-1).numpy()
            ctcvr = (predicted["ctr"] * predicted["cvr"]).squeeze(-1).numpy()
            rows.append(scores(label, cvr, ctcvr, time.perf_counter() - started))
            print(rows[-1], flush=True)
    runs = pd.DataFrame(rows)
    print(f"\ntest metrics, mean and std over {args.seeds} seeds (relatedness {args.relatedness}, rates {rates}, towers {towers})")
    print(runs.groupby("model", sort=False)[METRICS].agg(["mean", "std"]).to_string(float_format=lambda v: f"{v:.4f}"))
    # Seeds draw funnels of different difficulty: each model's gap to ESMM on the same seed.
    base = runs[runs.model == "esmm"].set_index("seed")[METRICS]
    others = runs[~runs.model.isin(["esmm", "true probabilities"])].set_index("seed")
    gaps = others[METRICS] - base
    gaps["model"] = others["model"]
    summary = gaps.groupby("model", sort=False)[METRICS].agg(["mean", "min", "max"])
    better = [m for m in METRICS if m != "cvr_bias"]  # a bias is better smaller in size, either sign
    ahead = gaps.assign(**{m: (gaps[m] < 0) if m in LOWER_IS_BETTER else (gaps[m] > 0) for m in better})
    ahead = ahead.groupby("model", sort=False)[better].sum()
    print("\nminus ESMM, paired by seed (mean, min, max)")
    print(summary.to_string(float_format=lambda v: f"{v:+.4f}"))
    print("\nseeds where the model beats ESMM")
    print(ahead.to_string())


if __name__ == "__main__":
    main()
