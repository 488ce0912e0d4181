"""Per-task metrics on tensors: exact tie-aware ROC AUC, logloss, MSE, MAE, group AUC, normalised Gini, the AUC of amounts above 0."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from mtlkit.errors import ConfigError
from mtlkit.tasks import TaskSpec

__all__ = ["roc_auc", "group_auc", "log_loss", "mean_squared_error", "mean_absolute_error", "normalized_gini", "positive_auc",
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


def roc_auc(scores: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> float:
    """Exact area under the ROC curve, ties counted as one half (Mann-Whitney U).

    Args:
        scores: ``(N,)`` any monotone score (logit or probability).
        labels: ``(N,)`` in {0, 1}.
        weight: optional ``(N,)`` row weights: each (positive, negative) pair counts with the product
            of their weights (as ``sklearn.metrics.roc_auc_score``'s ``sample_weight``).

    Returns NaN when only one class is present.
    """
    scores = scores.detach().reshape(-1).double()
    labels = labels.detach().reshape(-1)
    positives = labels == 1
    if weight is not None:
        return _weighted_auc(scores, positives, weight.detach().reshape(-1).double())
    num_pos = int(positives.sum())
    num_neg = labels.numel() - num_pos
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    rank_sum = ranks[positives].sum().item()
    return (rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg)


def _weighted_auc(scores: torch.Tensor, positives: torch.Tensor, weight: torch.Tensor) -> float:
    # Per distinct score: the positive weight there meets all negative weight below it, and half of
    # the negative weight tied with it.
    values, inverse = torch.unique(scores, return_inverse=True)
    pos = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, weight * positives)
    neg = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, weight * ~positives)
    total_pos, total_neg = pos.sum().item(), neg.sum().item()
    if total_pos <= 0 or total_neg <= 0:
        return float("nan")
    below = torch.cumsum(neg, 0) - neg
    return (pos * (below + 0.5 * neg)).sum().item() / (total_pos * total_neg)


def _mean(values: torch.Tensor, weight: torch.Tensor | None) -> float:
    """The mean of ``values`` (float64), weighted by ``weight`` when given (NaN for zero total weight)."""
    if weight is None:
        return values.mean().item()
    w = weight.detach().reshape(-1).double()
    total = w.sum().item()
    return (values * w).sum().item() / total if total > 0 else float("nan")


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


def log_loss(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> float:
    """Mean cross-entropy computed from logits (stable, never log(0)): binary for ``(N,)`` logits,
    over classes for ``(N, C)`` logits and class-index labels; weighted by ``weight`` when given."""
    if logits.dim() == 2:
        return _mean(F.cross_entropy(logits.double(), labels.long(), reduction="none"), weight)
    return _mean(F.binary_cross_entropy_with_logits(logits.double().reshape(-1), labels.double().reshape(-1),
                                                    reduction="none"), weight)


def normalized_entropy(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> float:
    """Log loss over the entropy of the rows' own positive rate (He et al., ADKDD 2014): below 1 the
    model knows more than the base rate; comparable across data sets of different click rates.
    Undefined (NaN) when every label is the same."""
    rate = torch.tensor(_mean(labels.double().reshape(-1), weight), dtype=torch.float64)
    base = -(torch.special.xlogy(rate, rate) + torch.special.xlogy(1 - rate, 1 - rate)).item()
    return log_loss(logits, labels, weight) / base if base > 0 else float("nan")


def calibration(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> float:
    """Predicted positives over observed ones, ``sum(p) / sum(y)`` (each row counted with its weight):
    1 when the probabilities are right on average (what bidding and ranking by expected value need),
    above 1 when they overpredict. Undefined (NaN) without positive labels."""
    observed = _mean(labels.double().reshape(-1), weight)
    return _mean(torch.sigmoid(logits.double().reshape(-1)), weight) / observed if observed > 0 else float("nan")


def accuracy(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> float:
    """Share of rows (of weight) whose highest logit (of ``(N, C)``) is their class index."""
    return _mean((logits.argmax(1) == labels.long()).double(), weight)


def poisson_deviance(rates: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> float:
    """Mean Poisson deviance ``2 (y log(y / mu) - (y - mu))`` of predicted rates ``mu`` (> 0): 0 for
    perfect predictions; the count analogue of the MSE."""
    mu, y = rates.double().reshape(-1), labels.double().reshape(-1)
    return _mean(2 * (torch.special.xlogy(y, y) - torch.special.xlogy(y, mu) - (y - mu)), weight)


def _gain_gini(scores: torch.Tensor, amounts: torch.Tensor, weight: torch.Tensor) -> float:
    """Raw Gini of the gain chart of ``amounts`` ranked by ``scores`` (highest first): ``2 A - 1``, ``A``
    the mean over rows of the share of the total amount held by the rows ranked up to them.
    Rows with tied scores count in expectation over their random orders; a row of weight ``w``
    counts as ``w`` rows."""
    values, inverse = torch.unique(-scores, return_inverse=True)  # ascending -score: highest score first
    groups = len(values)
    group_weight = torch.zeros(groups, dtype=torch.float64).index_add_(0, inverse, weight)
    group_amount = torch.zeros(groups, dtype=torch.float64).index_add_(0, inverse, weight * amounts)
    # E[sum_i w_i (sum of w_j y_j ranked up to i)] within a group of tied rows: pairs in either order
    # with probability 1/2, each row with itself always.
    within = 0.5 * (group_weight * group_amount
                    + torch.zeros(groups, dtype=torch.float64).index_add_(0, inverse, weight**2 * amounts))
    before = torch.cumsum(group_amount, 0) - group_amount
    total_weight, total_amount = weight.sum(), group_amount.sum()
    area = ((group_weight * before).sum() + within.sum()) / (total_amount * total_weight)
    return (2 * area - 1).item()


def normalized_gini(predictions: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> float:
    """Normalised Gini coefficient of non-negative amounts (spend, lifetime value) ranked by ``predictions``
    (Wang, Liu & Miao 2019): the Gini of the gain chart (the share of the total amount held by the
    top-ranked rows) over the Gini of the perfect ranking, so 1 for the labels' own order, 0 for a
    random one. It judges the ranking only, not the scale; ties count in expectation over their
    orders, each row with its weight. NaN when every amount is 0 or all are equal."""
    scores = predictions.detach().reshape(-1).double()
    amounts = labels.detach().reshape(-1).double()
    w = torch.ones_like(amounts) if weight is None else weight.detach().reshape(-1).double()
    if not bool(((w * amounts).sum() > 0)):
        return float("nan")
    perfect = _gain_gini(amounts, amounts, w)
    return _gain_gini(scores, amounts, w) / perfect if perfect > 0 else float("nan")


def positive_auc(scores: torch.Tensor, amounts: torch.Tensor, weight: torch.Tensor | None = None) -> float:
    """:func:`roc_auc` of ``scores`` against ``amounts > 0`` (who spends or buys at all, for ``ziln`` and ``poisson`` tasks)."""
    return roc_auc(scores, (amounts.detach().reshape(-1) > 0).to(torch.float64), weight)


def mean_squared_error(predictions: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> float:
    return _mean((predictions.double().reshape(-1) - labels.double().reshape(-1)) ** 2, weight)


def mean_absolute_error(predictions: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> float:
    return _mean((predictions.double().reshape(-1) - labels.double().reshape(-1)).abs(), weight)


# Every metric takes the task's raw model output (first column for one-wide heads; its predictions for task types
# with ``metrics_on_predictions``), the labels and optional row weights.
METRICS: dict[str, Callable[..., float]] = {
    "auc": roc_auc,
    "accuracy": accuracy,
    "logloss": log_loss,
    "ne": normalized_entropy,
    "calibration": calibration,
    "mse": mean_squared_error,
    "mae": mean_absolute_error,
    "deviance": poisson_deviance,
    "gini": normalized_gini,
    "positive_auc": positive_auc,
}


# Metrics where more is better (early stopping and reports turn the others' direction around).
HIGHER_IS_BETTER = frozenset({"auc", "gauc", "accuracy", "gini", "positive_auc"})
# Metrics best at a target value rather than at one end: no direction to stop early on.
NOT_MONITORABLE = frozenset({"calibration"})


def task_metrics(
    outputs: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    label_mask: torch.Tensor,
    tasks: Sequence[TaskSpec],
    sample_weight: torch.Tensor | None = None,
) -> dict[str, dict[str, float]]:
    """The metrics of each task's type, over that task's labelled rows.

    Args:
        outputs: ``{task: (N, output_dim)}`` raw outputs.
        labels, label_mask: ``(N, K)``.
        sample_weight: optional ``(N,)`` row weights (the schema's ``weight_column``): every metric
            then counts each row with its weight, as the loss does (a table whose negatives were
            sampled at 10 % with weight 10 gets the metrics of the full table).

    Returns:
        ``{task: {metric: value, "count": labelled rows}}``.
    """
    result: dict[str, dict[str, float]] = {}
    for k, task in enumerate(tasks):
        mask = label_mask[:, k]
        raw = outputs[task.name][mask]
        output = task.task_type.predict(raw).reshape(len(raw), -1) if task.task_type.metrics_on_predictions else raw
        label = labels[mask, k]
        weight = None if sample_weight is None else sample_weight[mask]
        values: dict[str, float] = {"count": float(mask.sum())}
        for name in task.task_type.metrics:
            if name not in METRICS:
                raise ConfigError(f"task type {task.type!r} asks for unknown metric {name!r}; known: {sorted(METRICS)}")
            if name in task.task_type.metric_scores:
                scored = task.task_type.metric_scores[name](raw)
            else:
                scored = output[:, 0] if output.shape[1] == 1 else output
            values[name] = METRICS[name](scored, label, weight) if label.numel() else float("nan")
        result[task.name] = values
    return result
