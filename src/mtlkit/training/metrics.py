"""Per-task metrics computed on tensors: exact tie-aware ROC AUC, logloss, MSE, MAE, group AUC."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from mtlkit.errors import ConfigError
from mtlkit.tasks import TaskSpec

__all__ = ["roc_auc", "group_auc", "log_loss", "mean_squared_error", "mean_absolute_error",
           "METRICS", "task_metrics"]


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks with ties given their average rank (as ``scipy.stats.rankdata``)."""
    order = torch.argsort(values)
    sorted_values = values[order]
    _, inverse, counts = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    average = ends - (counts.double() - 1) / 2  # mean of positions start+1 .. end
    ranks = torch.empty_like(average[inverse])
    ranks[order] = average[inverse]
    return ranks


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact area under the ROC curve, ties counted as one half (Mann-Whitney U).

    Args:
        scores: ``(N,)`` any monotone score (logit or probability).
        labels: ``(N,)`` in {0, 1}.

    Returns NaN when only one class is present.
    """
    scores = scores.detach().reshape(-1).double()
    labels = labels.detach().reshape(-1)
    positives = labels == 1
    num_pos = int(positives.sum())
    num_neg = labels.numel() - num_pos
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    rank_sum = ranks[positives].sum().item()
    return (rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg)


def group_auc(scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> float:
    """GAUC: the AUC of each group (user) weighted by its number of rows; groups with one class are skipped."""
    groups = groups.reshape(-1)
    total, weight = 0.0, 0
    for group in torch.unique(groups):
        rows = groups == group
        auc = roc_auc(scores[rows], labels[rows])
        if auc == auc:  # not NaN
            n = int(rows.sum())
            total += auc * n
            weight += n
    return total / weight if weight else float("nan")


def log_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean cross-entropy computed from logits (stable, never log(0)): binary for ``(N,)`` logits,
    over classes for ``(N, C)`` logits and class-index labels."""
    if logits.dim() == 2:
        return F.cross_entropy(logits.double(), labels.long()).item()
    return F.binary_cross_entropy_with_logits(logits.double().reshape(-1), labels.double().reshape(-1)).item()


def normalized_entropy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Log loss over the entropy of the rows' own positive rate (He et al., ADKDD 2014): below 1 the
    model knows more than the base rate; comparable across data sets of different click rates.
    Undefined (NaN) when every label is the same."""
    rate = labels.double().mean()
    base = -(torch.special.xlogy(rate, rate) + torch.special.xlogy(1 - rate, 1 - rate)).item()
    return log_loss(logits, labels) / base if base > 0 else float("nan")


def calibration(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Predicted positives over observed ones, ``sum(p) / sum(y)``: 1 when the probabilities are right on
    average (what bidding and ranking by expected value need), above 1 when they overpredict.
    Undefined (NaN) without positive labels."""
    positives = labels.double().sum().item()
    return torch.sigmoid(logits.double()).sum().item() / positives if positives > 0 else float("nan")


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of rows whose highest logit (of ``(N, C)``) is their class index."""
    return (logits.argmax(1) == labels.long()).double().mean().item()


def poisson_deviance(rates: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean Poisson deviance ``2 (y log(y / mu) - (y - mu))`` of predicted rates ``mu`` (> 0): 0 for
    perfect predictions; the count analogue of the MSE."""
    mu, y = rates.double().reshape(-1), labels.double().reshape(-1)
    return (2 * (torch.special.xlogy(y, y) - torch.special.xlogy(y, mu) - (y - mu))).mean().item()


def mean_squared_error(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    return torch.mean((predictions.double().reshape(-1) - labels.double().reshape(-1)) ** 2).item()


def mean_absolute_error(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    return torch.mean((predictions.double().reshape(-1) - labels.double().reshape(-1)).abs()).item()


# Every metric takes the task's raw model output (first column for one-wide heads; its predictions for task types
# with ``metrics_on_predictions``) and the labels.
METRICS: dict[str, Callable[[torch.Tensor, torch.Tensor], float]] = {
    "auc": roc_auc,
    "accuracy": accuracy,
    "logloss": log_loss,
    "ne": normalized_entropy,
    "calibration": calibration,
    "mse": mean_squared_error,
    "mae": mean_absolute_error,
    "deviance": poisson_deviance,
}


# Metrics where more is better (early stopping and reports turn the others' direction around).
HIGHER_IS_BETTER = frozenset({"auc", "gauc", "accuracy"})
# Metrics best at a target value rather than at one end: no direction to stop early on.
NOT_MONITORABLE = frozenset({"calibration"})


def task_metrics(
    outputs: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    label_mask: torch.Tensor,
    tasks: Sequence[TaskSpec],
) -> dict[str, dict[str, float]]:
    """The metrics of each task's type, over that task's labelled rows.

    Args:
        outputs: ``{task: (N, output_dim)}`` raw outputs.
        labels, label_mask: ``(N, K)``.

    Returns:
        ``{task: {metric: value, "count": labelled rows}}``.
    """
    result: dict[str, dict[str, float]] = {}
    for k, task in enumerate(tasks):
        mask = label_mask[:, k]
        output = outputs[task.name][mask]
        if task.task_type.metrics_on_predictions:
            output = task.task_type.predict(output).reshape(len(output), -1)
        label = labels[mask, k]
        values: dict[str, float] = {"count": float(mask.sum())}
        for name in task.task_type.metrics:
            if name not in METRICS:
                raise ConfigError(f"task type {task.type!r} asks for unknown metric {name!r}; known: {sorted(METRICS)}")
            values[name] = METRICS[name](output[:, 0] if output.shape[1] == 1 else output, label) if label.numel() else float("nan")
        result[task.name] = values
    return result
