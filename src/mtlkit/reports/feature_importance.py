"""Permutation feature importance, per task: which columns each task's predictions rely on.

A column's values are shuffled across the rows (breaking its link to the labels and keeping its
distribution), the table is encoded and scored again, and the task's main metric gets worse by the
column's importance. It works on the raw table, so a column means what the user declared (a dense
value with its embedded buckets, a multi-valued list), whatever the encoding. Multi-task models
make it doubly useful: tasks that lean on different columns are the ones that compete for shared
capacity, and a column that one task leans on far more than seems plausible is a leak to look for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from mtlkit.tasks import TaskSpec
from mtlkit.training.metrics import HIGHER_IS_BETTER

__all__ = ["FeatureImportance", "primary_metric", "permutation_importance"]

Scorer = Callable[[pd.DataFrame], Mapping[str, Mapping[str, float]]]


def primary_metric(task: TaskSpec) -> str:
    """The metric importance is measured on: the first of the task type's (AUC, MSE, accuracy)."""
    return task.task_type.metrics[0]


@dataclass
class FeatureImportance:
    """Importance of every feature column for every task.

    Attributes:
        metrics: ``{task: metric}`` the metric each task is judged by.
        baseline: ``{task: value}`` on the table as it is.
        mean, std: ``(columns x tasks)`` frames: how much the metric gets worse when the column is
            shuffled (AUC and accuracy: the drop; MSE: the rise, in the label's units), over repeats.
        repeats: shuffles per column.
    """

    metrics: dict[str, str]
    baseline: dict[str, float]
    mean: pd.DataFrame
    std: pd.DataFrame
    repeats: int

    def table(self) -> pd.DataFrame:
        """One row per column, ``<task>`` and ``<task>_std`` per task, most important first (by the
        mean over tasks of each task's importance relative to its largest)."""
        scale = self.mean.abs().max().replace(0.0, 1.0)
        order = (self.mean / scale).mean(axis=1).sort_values(ascending=False).index
        out = pd.DataFrame(index=order)
        for task in self.mean.columns:
            out[task] = self.mean.loc[order, task]
            out[f"{task}_std"] = self.std.loc[order, task]
        out.index.name = "column"
        return out


def permutation_importance(frame: pd.DataFrame, columns: Sequence[str], tasks: Sequence[TaskSpec], score: Scorer,
                           repeats: int = 3, seed: int = 0) -> FeatureImportance:
    """Shuffle each of ``columns`` in ``frame`` ``repeats`` times and score the table each time.

    ``score(frame) -> {task: {metric: value}}`` encodes and evaluates a table (metrics in the labels'
    units). The same seed gives the same shuffles, hence the same numbers.
    """
    if repeats < 1:
        raise ValueError(f"repeats: expected at least 1, got {repeats}")
    metrics = {t.name: primary_metric(t) for t in tasks}
    base_scores = score(frame)
    baseline = {name: float(base_scores[name][metric]) for name, metric in metrics.items()}
    rng = np.random.default_rng(seed)
    drops: dict[str, list[list[float]]] = {}
    for column in columns:
        runs = []
        for _ in range(repeats):
            shuffled = frame.copy(deep=False)
            shuffled[column] = frame[column].to_numpy()[rng.permutation(len(frame))]
            scores = score(shuffled)
            runs.append([_worse_by(metric, baseline[name], float(scores[name][metric])) for name, metric in metrics.items()])
        drops[column] = runs
    values = np.array([drops[c] for c in columns])  # (columns, repeats, tasks)
    names = list(metrics)
    return FeatureImportance(
        metrics=metrics, baseline=baseline, repeats=repeats,
        mean=pd.DataFrame(values.mean(axis=1), index=list(columns), columns=names),
        std=pd.DataFrame(values.std(axis=1, ddof=1) if repeats > 1 else np.zeros(values.shape[::2]),
                         index=list(columns), columns=names))


def _worse_by(metric: str, baseline: float, shuffled: float) -> float:
    return baseline - shuffled if metric in HIGHER_IS_BETTER else shuffled - baseline
