"""What standardising a regression label changes: click (binary) and watch time (regression) on one table.

The table is synthetic, with known signal: a click's log-odds come from three dense features and a
categorical one; watch time from two other features and one the click shares, plus noise. Watch time
is written once in "minutes" (about 30 +- 1) and once in "seconds-like" units (about 18,000 +- 700).
Each table trains MMoE through ``train_run`` with ``schema.standardize_labels`` on and off, over
several seeds, and the test scores are printed (watch MSE also as a share of its noise variance,
the best any model can do):

    python examples/label_scale.py --seeds 3

It takes about 10 seconds per seed on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from mtlkit.experiments.tabular_run import RunConfig, train_run

NOISE = 0.5  # standard deviation of watch time's noise, in "minutes"


def make_table(rows: int, scale: float, seed: int) -> pd.DataFrame:
    """``rows`` rows of ten dense features, one categorical, a click and a watch time in units of ``scale``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 10))
    category = rng.integers(0, 50, rows)
    category_effect = np.random.default_rng(12345).normal(size=50)  # the same effects in every table
    click_logit = x[:, 0] - 0.8 * x[:, 1] * x[:, 2] + category_effect[category] - 1
    watch = np.sin(x[:, 3]) + 0.5 * x[:, 4] ** 2 + 0.5 * x[:, 0] + NOISE * rng.normal(size=rows)
    table = pd.DataFrame(x, columns=[f"x{i}" for i in range(10)])
    table["category"] = category.astype(str)
    table["click"] = (rng.random(rows) < 1 / (1 + np.exp(-click_logit))).astype(int)
    table["watch"] = scale * (30 + watch)
    return table


def run_config(folder: Path, standardize: bool, seed: int, **training) -> RunConfig:
    """MMoE on ``folder``'s train.csv and test.csv (click, watch), with ``training`` options added."""
    return RunConfig(
        data={"train": str(folder / "train.csv"), "test": str(folder / "test.csv")},
        schema={"tasks": [{"name": "click"}, {"name": "watch", "type": "regression"}],
                "dense": [f"x{i}" for i in range(10)], "categorical": ["category"], "standardize_labels": standardize},
        model={"name": "mmoe", "num_experts": 4, "expert_hidden": [32], "tower_hidden": [16]},
        training={"max_epochs": 15, "batch_size": 512, "patience": 3, "progress": False, **training},
        seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=40_000)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for seed in range(args.seeds):
            for unit, scale in (("minutes", 1.0), ("seconds", 600.0)):
                table = make_table(args.rows, scale, seed)
                cut = int(0.8 * len(table))
                table.iloc[:cut].to_csv(folder / "train.csv", index=False)
                table.iloc[cut:].to_csv(folder / "test.csv", index=False)
                for standardize in (True, False):
                    run = train_run(run_config(folder, standardize, seed), folder / "run", overwrite=True)
                    test = json.loads((run / "metrics.json").read_text())["test"]
                    rows.append({"seed": seed, "unit": unit, "standardize_labels": standardize,
                                 "click_auc": test["click"]["auc"],
                                 "watch_mse_over_noise": test["watch"]["mse"] / (NOISE * scale) ** 2})
                    print(rows[-1], flush=True)
    results = pd.DataFrame(rows)
    summary = results.groupby(["unit", "standardize_labels"])[["click_auc", "watch_mse_over_noise"]].agg(["mean", "std"])
    print(summary.to_string(float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    main()
