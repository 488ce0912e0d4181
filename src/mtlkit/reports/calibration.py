"""Reliability of predicted probabilities: predicted against observed positive rates, bin by bin.

Ranking needs only the order of the scores (AUC); bidding, budgeting and ranking by expected value
(pCTR x pCVR x price) need the probabilities themselves to be right. A model can have a good AUC and
predict twice the real rate, and multi-task training shifts each task's rate differently, so a run
shows each binary task's reliability curve next to its ``calibration`` metric. Counts (``poisson``)
and amounts (``ziln``) get the same chart over their predicted means: the decile chart with which
the ZILN paper judges lifetime-value models next to their normalised Gini; and one of their
predicted probability of a value above 0 against the observed share.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
import torch

from mtlkit.reports.plots import label_axes, plt, save_figure

__all__ = ["RELIABILITY_AXES", "POSITIVE_SHARE_AXES", "reliability_table", "plot_reliability"]

# The task types whose predictions are means in the labels' own units, with the chart's axis names.
RELIABILITY_AXES: dict[str, tuple[str, str]] = {
    "binary": ("mean predicted probability", "observed positive rate"),
    "poisson": ("mean predicted count", "observed mean count"),
    "ziln": ("mean predicted amount", "observed mean amount"),
}
# The same chart for a count's or amount's predicted probability of being above 0 (``<task>_p_positive``).
POSITIVE_SHARE_AXES = ("mean predicted P(above 0)", "observed share above 0")


def reliability_table(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = 10) -> pd.DataFrame:
    """Rows sorted by predicted probability and cut into ``bins`` groups of (nearly) equal size.

    Shapes: ``(N,)`` and ``(N,)`` (labels 0/1). Returns one row per bin: ``mean_predicted``,
    ``observed_rate`` and ``rows``; a calibrated model has the two rates equal in every bin.
    """
    p = probabilities.detach().double().reshape(-1).cpu().numpy()  # from wherever the model ran
    y = labels.detach().double().reshape(-1).cpu().numpy()
    if len(p) == 0:
        raise ValueError("reliability_table: no rows")
    order = np.argsort(p, kind="stable")
    groups = np.array_split(order, min(bins, len(p)))
    return pd.DataFrame({"mean_predicted": [p[g].mean() for g in groups], "observed_rate": [y[g].mean() for g in groups],
                         "rows": [len(g) for g in groups]})


def plot_reliability(tables: Mapping[str, pd.DataFrame], path: str | os.PathLike, title: str,
                     axis_names: Mapping[str, tuple[str, str]] | None = None) -> Path:
    """One panel per task: observed against mean predicted rate per bin, on log axes when the rates
    span more than a factor of 10 (click and conversion rates of a few percent), with the diagonal.
    ``axis_names`` gives a task's (x, y) axis names (default: probabilities, :data:`RELIABILITY_AXES`)."""
    figure, axes = plt.subplots(1, len(tables), figsize=(4.0 * len(tables), 3.8), squeeze=False)
    for ax, (task, table) in zip(axes[0], tables.items()):
        positive = table[(table["mean_predicted"] > 0) & (table["observed_rate"] > 0)]
        low = min(table["mean_predicted"].min(), table["observed_rate"].min())
        high = max(table["mean_predicted"].max(), table["observed_rate"].max())
        ratio = table["mean_predicted"].mul(table["rows"]).sum() / max(table["observed_rate"].mul(table["rows"]).sum(), 1e-12)
        if low > 0 and high / low > 10:
            ax.set_xscale("log")
            ax.set_yscale("log")
            table = positive
        ax.plot([low, high], [low, high], color="grey", linewidth=1, linestyle="--", label="calibrated")
        ax.plot(table["mean_predicted"], table["observed_rate"], marker="o", label=f"predicted / observed {ratio:.3f}")
        label_axes(ax, task, *(axis_names or {}).get(task, RELIABILITY_AXES["binary"]))
    figure.suptitle(title)
    figure.tight_layout()
    return save_figure(figure, path)
