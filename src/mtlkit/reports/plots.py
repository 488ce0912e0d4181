"""Figures for runs and paper reproductions (matplotlib, written atomically as PNG)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # figures are files; never require a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mtlkit.files import atomic_write  # noqa: E402

__all__ = ["save_figure", "label_axes", "plot_loss_curves", "plot_final_loss_distribution", "plot_learning_curves", "plot_metric_bars",
           "plot_mtl_gain", "gain_tasks"]

MODEL_LABELS = {
    "single_task": "Single-Task",
    "shared_bottom": "Shared-Bottom",
    "cross_stitch": "Cross-Stitch",
    "omoe": "OMoE",
    "mmoe": "MMoE",
    "cgc": "CGC",
    "ple": "PLE",
    "adatt": "AdaTT",
    "stem": "STEM",
    "esmm": "ESMM",
    "escm2": "ESCM2-IPS",
    "esmm_funnel": "ESMM funnel",
    "aitm": "AITM",
    "gbdt": "GBDT",
}


def model_label(name: str) -> str:
    """Display name of a registered model."""
    return MODEL_LABELS.get(name, name)


def label_axes(ax: plt.Axes, title: str, xlabel: str, ylabel: str) -> None:
    """Title, axis labels, a light grid and a small legend: the house style of a line panel."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def save_figure(figure: plt.Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save as PNG through a temporary file, then close the figure."""
    try:
        return atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight"))
    finally:
        plt.close(figure)


def _model_order(names: Sequence[str]) -> list[str]:
    known = list(MODEL_LABELS)
    return sorted(set(names), key=lambda n: (known.index(n) if n in known else len(known), n))


def plot_loss_curves(curves: pd.DataFrame, path: str | os.PathLike, title: str) -> Path:
    """The MMoE paper's Figure 4: mean test loss against training steps, one panel per correlation.

    Line: mean over seeds; band: the interquartile range over seeds. The y axis is logarithmic because
    losses fall by orders of magnitude and the seeds' problems differ in difficulty.

    Args:
        curves: columns ``model, correlation, seed, step, loss`` (loss = mean over tasks).
    """
    correlations = sorted(curves["correlation"].unique(), reverse=True)
    figure, axes = plt.subplots(1, len(correlations), figsize=(4.2 * len(correlations), 3.6), sharey=True, squeeze=False)
    for ax, corr in zip(axes[0], correlations):
        part = curves[curves["correlation"] == corr]
        for model in _model_order(part["model"]):
            by_step = part[part["model"] == model].groupby("step")["loss"]
            mean, low, high = by_step.mean(), by_step.quantile(0.25), by_step.quantile(0.75)
            line, = ax.plot(mean.index, mean, label=model_label(model), linewidth=1.6)
            ax.fill_between(mean.index, low, high, color=line.get_color(), alpha=0.12)
        ax.set_title(f"correlation = {corr:g}")
        ax.set_xlabel("training step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("mean test loss (MSE)")
    axes[0][0].legend(fontsize=8)
    figure.suptitle(title)
    return save_figure(figure, path)


def plot_final_loss_distribution(summary: pd.DataFrame, path: str | os.PathLike, title: str) -> Path:
    """The MMoE paper's Figure 5 (trainability): the spread of final test losses over repeated runs.

    One panel per correlation; per model a box plot with every run drawn as a dot.

    Args:
        summary: columns ``model, correlation, mean_loss``.
    """
    correlations = sorted(summary["correlation"].unique(), reverse=True)
    models = _model_order(summary["model"])
    figure, axes = plt.subplots(1, len(correlations), figsize=(4.2 * len(correlations), 3.8), sharey=True, squeeze=False)
    rng = np.random.default_rng(0)
    for ax, corr in zip(axes[0], correlations):
        part = summary[summary["correlation"] == corr]
        values = [part.loc[part["model"] == m, "mean_loss"].to_numpy() for m in models]
        ax.boxplot(values, showfliers=False, widths=0.6)
        for i, v in enumerate(values, start=1):
            ax.scatter(i + rng.uniform(-0.15, 0.15, len(v)), v, s=10, alpha=0.7)
        ax.set_xticks(range(1, len(models) + 1), [model_label(m) for m in models], rotation=35, ha="right", fontsize=8)
        ax.set_title(f"correlation = {corr:g}")
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("final mean test loss")
    figure.suptitle(title)
    return save_figure(figure, path)


def plot_learning_curves(history: pd.DataFrame, path: str | os.PathLike, title: str = "learning curves") -> Path:
    """Per-task loss against steps for each split (train / valid / ...), one panel per task, and a
    panel of the loss weights when a weighting changed them during training (``dwa``, ``gradnorm``, ...).

    Args:
        history: the trainer's history rows (columns ``step, split, task, loss``; ``weight`` on the
            training rows).
    """
    tasks = list(dict.fromkeys(history["task"]))
    train_rows = history[history["split"] == "train"]
    weights = train_rows.pivot_table(index="step", columns="task", values="weight") if "weight" in history else None
    changing = weights is not None and bool((weights.nunique() > 1).any())
    panels = len(tasks) + changing
    figure, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), squeeze=False)
    if changing:
        ax = axes[0, -1]
        for task in tasks:
            ax.plot(weights.index, weights[task], label=task)
        label_axes(ax, "loss weights", "training step", "weight")
    for ax, task in zip(axes[0], tasks):
        part = history[history["task"] == task]
        for split in dict.fromkeys(part["split"]):
            rows = part[part["split"] == split]
            ax.plot(rows["step"], rows["loss"], label=split)
        label_axes(ax, task, "training step", "loss")
    figure.suptitle(title)
    return save_figure(figure, path)


def plot_metric_bars(table: pd.DataFrame, path: str | os.PathLike, title: str, metric_label: str = "test AUC") -> Path:
    """Grouped bars of mean +- std per model, one panel per task.

    Args:
        table: columns ``model, task, mean, std``.
    """
    tasks = list(dict.fromkeys(table["task"]))
    models = _model_order(table["model"])
    figure, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        part = table[table["task"] == task].set_index("model").reindex(models)
        ax.bar(range(len(models)), part["mean"], yerr=part["std"].fillna(0), capsize=3, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(models)), [model_label(m) for m in models], rotation=35, ha="right", fontsize=8)
        low = float(np.nanmin(part["mean"] - part["std"].fillna(0)))
        high = float(np.nanmax(part["mean"] + part["std"].fillna(0)))
        pad = max((high - low) * 0.3, 1e-3)
        ax.set_ylim(low - pad, high + pad)
        ax.set_title(task)
        ax.set_ylabel(metric_label)
        ax.grid(alpha=0.3, axis="y")
    figure.suptitle(title)
    return save_figure(figure, path)


def gain_tasks(gain: pd.DataFrame) -> list[str]:
    """The tasks of an MTL-gain table, read from its ``gain_<task>`` columns."""
    return [c[len("gain_"):] for c in gain.columns if c.startswith("gain_") and not c.endswith("_std")]


def plot_mtl_gain(gain: pd.DataFrame, path: str | os.PathLike, title: str) -> Path:
    """The PLE paper's synthetic figure: each task's MTL gain over the single-task model against the
    task correlation, one panel per task, a bar per model (mean over seeds, whiskers: std). Bars above
    0 beat the single-task model; a model whose bars point opposite ways for the two tasks at one
    correlation is the paper's "seesaw".

    Args:
        gain: columns ``model, correlation, gain_<task>, gain_<task>_std`` (``mtl_gain``'s table).
    """
    tasks = gain_tasks(gain)
    correlations = sorted(gain["correlation"].unique())
    models = _model_order(gain["model"])
    width = 0.8 / len(models)
    figure, axes = plt.subplots(1, len(tasks), figsize=(max(4.5, 1.0 + 0.9 * len(correlations)) * len(tasks), 3.8),
                                sharey=True, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for i, model in enumerate(models):
            part = gain[gain["model"] == model].set_index("correlation").reindex(correlations)
            offsets = np.arange(len(correlations)) + (i - (len(models) - 1) / 2) * width
            ax.bar(offsets, part[f"gain_{task}"], width, yerr=part[f"gain_{task}_std"].fillna(0), capsize=2,
                   label=model_label(model), alpha=0.85)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(correlations)), [f"{c:g}" for c in correlations])
        label_axes(ax, task, "task correlation", "MTL gain (single-task MSE - model's)")
    figure.suptitle(title)
    return save_figure(figure, path)
