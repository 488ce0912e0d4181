"""Auxiliary tasks for a main task: does MetaBalance help the purchase prediction of a funnel?

The recommendation set-up of MetaBalance (He et al., WWW 2022): purchases are what counts, clicks
and add-to-carts are there to help learn them. Each seed draws one synthetic funnel
(``mtlkit.data.make_funnel``: click -> cart -> purchase, step rates 0.2, 0.3, 0.3, so about 3 % of
impressions end in a purchase; 200,000 rows, 80/10/10 split). Every model trains with Adam and
early stopping on the validation purchase AUC. Compared, for each shared model:

- ``none``: the three tasks' losses summed (all weights 1);
- ``aux x W``: the auxiliary tasks' weights set to W (``--aux-weights``), the hand-tuned alternative;
- ``metabalance r=R``: ``gradient_surgery: metabalance`` with ``main_task: purchase`` and
  ``relax_factor`` R (``--relax-factors``), ``gradient_surgery_scope: shared``;

and a purchase-only network (``single_task`` trains a separate network per task, so the auxiliary
tasks do not touch the purchase one). The table shows the purchase test AUC (mean +- std over
seeds), its gap to the true probabilities' AUC on the same seed (seeds draw funnels of different
difficulty; 0 is the best possible), the paired difference to the same model's ``none`` run, and
the training time:

    python examples/metabalance_funnel.py --seeds 5

About eight minutes for 5 seeds on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from mtlkit.data import make_funnel
from mtlkit.models import build_model
from mtlkit.training import Trainer, TrainerConfig

STEPS, RATES, MAIN = ("click", "cart", "purchase"), (0.2, 0.3, 0.3), "purchase"
MODELS = {
    "shared_bottom": {"bottom_hidden": [128, 64, 32], "tower_hidden": [16]},
    "mmoe": {"num_experts": 6, "expert_hidden": [64, 32], "tower_hidden": [16]},
}
# single_task trains a separate network per task: the auxiliary tasks never touch the purchase one.
PURCHASE_ALONE = ("single_task", {"bottom_hidden": [128, 64, 32], "tower_hidden": []})


def variants(aux_weights: list[float], relax_factors: list[float]) -> dict[str, tuple[dict[str, float], dict]]:
    """Each variant's task weights and trainer settings, by label."""
    plain = {step: 1.0 for step in STEPS}
    found = {"none": (plain, {})}
    for weight in aux_weights:
        found[f"aux x {weight:g}"] = ({step: (1.0 if step == MAIN else weight) for step in STEPS}, {})
    for relax in relax_factors:
        found[f"metabalance r={relax:g}"] = (plain, {
            "gradient_surgery": "metabalance", "gradient_surgery_scope": "shared",
            "gradient_surgery_options": {"main_task": MAIN, "relax_factor": relax}})
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {list(MODELS)}")
    parser.add_argument("--aux-weights", default="0.1", help="comma-separated weights for the auxiliary tasks")
    parser.add_argument("--relax-factors", default="0.7", help="comma-separated MetaBalance relax factors")
    args = parser.parse_args()
    aux_weights = [float(w) for w in args.aux_weights.split(",") if w]
    relax_factors = [float(r) for r in args.relax_factors.split(",") if r]
    main_index = STEPS.index(MAIN)
    plan = [(*PURCHASE_ALONE, "purchase only", {step: 1.0 for step in STEPS}, {})]
    plan += [(name, MODELS[name], label, weights, settings) for name in args.models.split(",")
             for label, (weights, settings) in variants(aux_weights, relax_factors).items()]
    rows = []
    for seed in range(args.seeds):
        data = make_funnel(STEPS, RATES, num_rows=args.rows, seed=seed)
        train, valid, test = data.split([0.8, 0.1, 0.1], seed=seed)
        labels = test.labels[:, main_index].numpy()
        best = roc_auc_score(labels, test.probabilities[:, main_index])
        for name, options, label, weights, settings in plan:
            tasks = [dataclasses.replace(task, weight=weights[task.name]) for task in data.tasks]
            torch.manual_seed(seed)
            model = build_model(name, input_dim=data.inputs.shape[1], tasks=tasks, **options)
            config = TrainerConfig(max_epochs=args.epochs, batch_size=1024, patience=2, monitor=f"{MAIN}/auc",
                                   learning_rate=1e-3, progress=False, seed=seed, **settings)
            started = time.perf_counter()
            Trainer(model, config).fit(train.to_tensors(), valid.to_tensors())
            auc = roc_auc_score(labels, model.predict(test.inputs)[MAIN].numpy())
            rows.append({"seed": seed, "model": name, "variant": label, "auc": auc, "gap": auc - best,
                         "seconds": time.perf_counter() - started})
            print(rows[-1], flush=True)
    runs = pd.DataFrame(rows)
    plain = runs[runs.variant == "none"].set_index(["seed", "model"]).auc
    runs["vs none"] = runs.auc - plain.reindex(pd.MultiIndex.from_frame(runs[["seed", "model"]])).to_numpy()
    table = runs.groupby(["model", "variant"], sort=False).agg(
        auc=("auc", "mean"), auc_std=("auc", "std"), gap=("gap", "mean"), vs_none=("vs none", "mean"),
        vs_none_min=("vs none", "min"), vs_none_max=("vs none", "max"), seconds=("seconds", "mean"))
    print(f"\n{MAIN} test AUC, {args.seeds} seeds: mean, std, gap to the true probabilities' AUC, "
          "paired difference to the same model's plain run (mean, min, max), seconds")
    signed = {column: "{:+.4f}".format for column in ("gap", "vs_none", "vs_none_min", "vs_none_max")}
    print(table.to_string(formatters={"auc": "{:.4f}".format, "auc_std": "{:.4f}".format, "seconds": "{:.1f}".format, **signed}))


if __name__ == "__main__":
    main()
