"""Loss weightings compared: fixed (equal), DWA, uncertainty, GradNorm, random (RLW), GLS and FAMO, on the click + watch-time
table of ``label_scale.py``, with the watch time in seconds trained as it is (``standardize_labels:
false``: its loss is about 10^5 times the click's) and standardised (the default).

Each seed draws one table (40,000 rows, 20 % test) and trains MMoE through ``train_run`` with every
weighting; the table prints the test click AUC and watch MSE over its noise variance (1 is the best
any model can do), mean +- std over seeds, and the training time relative to ``fixed``:

    python examples/loss_weighting.py --seeds 3
    python examples/loss_weighting.py --seeds 3 --weightings fixed,imtl,uncertainty+imtl

An entry ``WEIGHTING+SURGERY`` adds ``training.gradient_surgery`` (``uncertainty+imtl`` is the IMTL
paper's hybrid, its learned loss scales and IMTL-G's direction; ``imtl`` alone is ``fixed+imtl``).
About two minutes on 2 cores with the defaults.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pandas as pd

from label_scale import NOISE, make_table, run_config  # the table and run of examples/label_scale.py
from mtlkit.experiments.tabular_run import train_run
from mtlkit.objectives import list_gradient_surgeries

WEIGHTINGS = ("fixed", "dwa", "uncertainty", "gradnorm", "rlw", "gls", "famo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=40_000)
    parser.add_argument("--weightings", default=",".join(WEIGHTINGS),
                        help="comma-separated weightings, each optionally WEIGHTING+SURGERY, or a surgery alone (with fixed)")
    parser.add_argument("--weighting-learning-rate", type=float, default=None,
                        help="training.weighting_learning_rate (uncertainty and gradnorm; default: the model's)")
    args = parser.parse_args()
    scale = 600.0  # seconds
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for seed in range(args.seeds):
            table = make_table(args.rows, scale, seed)
            cut = int(0.8 * len(table))
            table.iloc[:cut].to_csv(folder / "train.csv", index=False)
            table.iloc[cut:].to_csv(folder / "test.csv", index=False)
            for standardize in (False, True):
                for entry in args.weightings.split(","):
                    weighting, _, surgery = entry.partition("+")
                    if weighting in list_gradient_surgeries():
                        weighting, surgery = "fixed", weighting
                    learned = weighting in ("uncertainty", "gradnorm")
                    config = run_config(folder, standardize, seed, weighting=weighting, gradient_surgery=surgery or None,
                                        weighting_learning_rate=args.weighting_learning_rate if learned else None)
                    run = train_run(config, folder / "run", overwrite=True)
                    metrics = json.loads((run / "metrics.json").read_text())
                    rows.append({"seed": seed, "standardize_labels": standardize, "weighting": entry,
                                 "click_auc": metrics["test"]["click"]["auc"],
                                 "watch_mse_over_noise": metrics["test"]["watch"]["mse"] / (NOISE * scale) ** 2,
                                 "seconds_per_step": metrics["train_seconds"] / metrics["steps"]})
                    print(rows[-1], flush=True)
    results = pd.DataFrame(rows)
    fixed = results[results.weighting == "fixed"].set_index(["seed", "standardize_labels"])["seconds_per_step"]
    results["time_vs_fixed"] = results["seconds_per_step"] / fixed.loc[list(zip(results.seed, results.standardize_labels))].to_numpy()
    groups = results.groupby(["standardize_labels", "weighting"], sort=False)
    summary = pd.DataFrame({
        column: groups[column].mean().map("{:.4f}".format) + " +- " + groups[column].std().map("{:.4f}".format)
        for column in ("click_auc", "watch_mse_over_noise")})
    summary["time_vs_fixed"] = groups["time_vs_fixed"].mean().map("{:.2f}x".format)
    print(summary.to_string())


if __name__ == "__main__":
    main()
