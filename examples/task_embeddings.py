"""When tasks want different embeddings: STEM against shared-embedding models on a user x item table.

Two binary tasks ("like" and "share") on the same users and items. Each task's log-odds is a user
effect plus an item effect of its own; the tasks' item effects have correlation ``--correlation``
(0: each task ranks the items its own way; below 0: against each other), and shares are rare (about
6 % of rows, against 40 % likes), so in an embedding both tasks train, the likes' gradients
outnumber the shares'. Every model reads the same two categorical columns:

- ``mmoe`` and ``cgc`` with one shared embedding per value (``--embedding-dim`` wide, 2 by default);
- ``mmoe_wide`` with shared embeddings three times as wide (the embedding parameters of STEM);
- ``stem``: a copy per task plus a shared one, each ``--embedding-dim`` wide, and its ablation
  ``stem_no_stop`` (``stop_gradient: false``: every task trains every expert it mixes).

Each is trained through ``train_run`` over several seeds (a new table and initialisation per seed),
and the test AUCs are printed as mean +- std, beside the AUC of the true probabilities (the best
any model can do on those rows):

    python examples/task_embeddings.py --seeds 3

It takes about 30 seconds per seed on 2 cores.
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

TASKS = ("like", "share")
MODELS = {
    "mmoe": ({"name": "mmoe", "num_experts": 6}, 1),
    "mmoe_wide": ({"name": "mmoe", "num_experts": 6}, 3),
    "cgc": ({"name": "cgc", "num_shared_experts": 2, "num_task_experts": 2}, 1),
    "stem": ({"name": "stem", "num_shared_experts": 2, "num_task_experts": 2, "num_levels": 1}, 1),
    "stem_no_stop": ({"name": "stem", "num_shared_experts": 2, "num_task_experts": 2, "num_levels": 1,
                       "stop_gradient": False}, 1),
}


def make_table(rows: int, users: int, items: int, correlation: float, seed: int) -> tuple[pd.DataFrame, dict]:
    """``rows`` (user, item) pairs with a like and a share label, and each row's true log-odds per task.

    A task's log-odds is its user effect plus its item effect; the two tasks' item effects have
    correlation ``correlation``. Shares are rare (about 6 % of rows against 40 % likes), so in a shared
    embedding the likes' gradients outnumber the shares'."""
    rng = np.random.default_rng(seed)
    user_effect = {t: 0.7 * rng.normal(size=users) for t in TASKS}
    like_items = rng.normal(size=items)
    item_effect = {"like": 1.2 * like_items,
                   "share": 1.2 * (correlation * like_items + np.sqrt(1 - correlation ** 2) * rng.normal(size=items))}
    offset = {"like": -0.5, "share": -3.5}
    user = rng.integers(0, users, rows)
    item = rng.integers(0, items, rows)
    table = pd.DataFrame({"user": user.astype(str), "item": item.astype(str)})
    logits = {}
    for task in TASKS:
        logits[task] = user_effect[task][user] + item_effect[task][item] + offset[task]
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
    parser.add_argument("--embedding-dim", type=int, default=2)
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
    if "stem" in names:
        # Each seed is a new table, so the spread between seeds hides the models' differences: pair them.
        by_seed = results.pivot(index="seed", columns="model", values=[f"{t}_auc" for t in TASKS])
        paired = []
        for name in names:
            if name == "stem":
                continue
            for task in TASKS:
                gap = by_seed[(f"{task}_auc", "stem")] - by_seed[(f"{task}_auc", name)]
                paired.append({"stem against": name, "task": task, "mean AUC gap": gap.mean(),
                               "seeds where stem is ahead": f"{int((gap > 0).sum())} of {len(gap)}"})
        print(pd.DataFrame(paired).to_string(index=False, float_format=lambda v: f"{v:+.4f}"))


if __name__ == "__main__":
    main()
