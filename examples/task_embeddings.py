"""When tasks want different embeddings: STEM against shared-embedding models on a user x item table.

Two binary tasks ("like" and "share") on the same users and items. Each task's log-odds is a dot
product of a user factor and an item factor of rank 4; the tasks' item factors have correlation
``--correlation`` (0: each task ranks the items its own way, so one shared embedding per item must
serve two unrelated rankings). Every model reads the same two categorical columns:

- ``mmoe`` and ``cgc`` with one shared embedding per value (``--embedding-dim`` wide);
- ``mmoe, 3x wide`` with shared embeddings three times as wide (the embedding parameters of STEM);
- ``stem``: a copy per task plus a shared one, each ``--embedding-dim`` wide, and its ablation
  ``stem, no stop`` (``stop_gradient: false``: every task trains every expert it mixes).

Each is trained through ``train_run`` over several seeds (a new table and initialisation per seed),
and the test AUCs are printed as mean +- std, beside the AUC of the true probabilities (the best
any model can do on those rows):

    python examples/task_embeddings.py --seeds 3

It takes about a minute per seed on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from mtlkit.experiments.tabular_run import RunConfig, train_run

RANK = 4
TASKS = ("like", "share")
MODELS = {
    "mmoe": ({"name": "mmoe", "num_experts": 6}, 1),
    "mmoe, 3x wide": ({"name": "mmoe", "num_experts": 6}, 3),
    "cgc": ({"name": "cgc", "num_shared_experts": 2, "num_task_experts": 2}, 1),
    "stem": ({"name": "stem", "num_shared_experts": 2, "num_task_experts": 2, "num_levels": 1}, 1),
    "stem, no stop": ({"name": "stem", "num_shared_experts": 2, "num_task_experts": 2, "num_levels": 1,
                       "stop_gradient": False}, 1),
}


def make_table(rows: int, users: int, items: int, correlation: float, seed: int) -> tuple[pd.DataFrame, dict]:
    """``rows`` (user, item) pairs with a like and a share label, and each row's true log-odds per task."""
    rng = np.random.default_rng(seed)
    user_factors = {t: rng.normal(size=(users, RANK)) for t in TASKS}
    like_items = rng.normal(size=(items, RANK))
    item_factors = {"like": like_items,
                    "share": correlation * like_items + np.sqrt(1 - correlation ** 2) * rng.normal(size=(items, RANK))}
    user = rng.integers(0, users, rows)
    item = rng.integers(0, items, rows)
    table = pd.DataFrame({"user": user.astype(str), "item": item.astype(str)})
    logits = {}
    for task in TASKS:
        logits[task] = 1.5 * (user_factors[task][user] * item_factors[task][item]).sum(1) / np.sqrt(RANK) - 0.5
        table[task] = (rng.random(rows) < 1 / (1 + np.exp(-logits[task]))).astype(int)
    return table, logits


def run_config(folder: Path, model: dict, width: int, seed: int) -> RunConfig:
    return RunConfig(
        data={"train": str(folder / "train.csv"), "test": str(folder / "test.csv")},
        schema={"tasks": [{"name": t} for t in TASKS],
                "categorical": [{"name": c, "embedding_dim": width} for c in ("user", "item")]},
        model={"expert_hidden": [32], "tower_hidden": [16], **model},
        training={"max_epochs": 30, "batch_size": 512, "patience": 3, "progress": False},
        seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--correlation", type=float, default=0.0)
    parser.add_argument("--embedding-dim", type=int, default=4)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {list(MODELS)}")
    args = parser.parse_args()
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; expected some of {list(MODELS)}")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for seed in range(args.seeds):
            table, logits = make_table(args.rows, args.users, args.items, args.correlation, seed)
            cut = int(0.8 * len(table))
            table.iloc[:cut].to_csv(folder / "train.csv", index=False)
            table.iloc[cut:].to_csv(folder / "test.csv", index=False)
            rows.append({"seed": seed, "model": "true probabilities",
                         **{f"{t}_auc": roc_auc_score(table[t].iloc[cut:], logits[t][cut:]) for t in TASKS}})
            for name in names:
                model, wide = MODELS[name]
                run = train_run(run_config(folder, model, args.embedding_dim * wide, seed), folder / "run", overwrite=True)
                test = json.loads((run / "metrics.json").read_text())["test"]
                rows.append({"seed": seed, "model": name, **{f"{t}_auc": test[t]["auc"] for t in TASKS}})
                print(rows[-1], flush=True)
    results = pd.DataFrame(rows)
    summary = results.groupby("model", sort=False)[[f"{t}_auc" for t in TASKS]].agg(["mean", "std"])
    print(summary.to_string(float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    main()
