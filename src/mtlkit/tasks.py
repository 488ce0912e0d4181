"""Task descriptions and the task-type registry.

A :class:`TaskSpec` is the single source of truth for one prediction target: heads, losses,
metrics, predictions and report columns are all keyed by ``TaskSpec.name``, never by position.

A :class:`TaskType` says what a task's head emits and how it is scored: ``binary`` (one logit,
binary cross-entropy), ``regression`` (one value, squared error), ``huber`` (one value, Huber loss:
squared near the label, linear beyond one unit, which on standardised labels is one standard
deviation), ``poisson`` (one log-rate, Poisson negative log-likelihood, for counts), ``ziln``
(three outputs, the zero-inflated lognormal negative log-likelihood, for amounts that are often 0
and heavy-tailed otherwise: spend, lifetime value, watch time) and ``multiclass`` (one logit per
class, cross-entropy; the task sets ``num_classes``). New types are added with
:func:`register_task_type`; models never need to change because they only ask a task for its
``output_dim``.

This module sits below every layer (data, features, models, objectives, training) and imports
none of them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from mtlkit.errors import ConfigError, DataError

__all__ = [
    "TaskSpec",
    "TaskType",
    "StackedDict",
    "TaskOutputs",
    "in_float32",
    "register_task_type",
    "get_task_type",
    "list_task_types",
    "validate_tasks",
]


@dataclass(frozen=True)
class TaskType:
    """How one kind of target is predicted and scored.

    Attributes:
        name: registry key, e.g. ``"binary"``.
        output_dim: width of the head's raw output for one sample; None where each task sets it
            (``TaskSpec.num_classes`` of a ``multiclass`` task).
        loss: ``(output [B, output_dim], label [B]) -> per-sample loss [B]``. Takes raw model
            output (logits), never probabilities. With ``elementwise_loss`` it must also take
            ``(output [..., output_dim], label [...]) -> [...]`` element by element.
        predict: ``output [B, output_dim] -> prediction [B]`` (or ``[B, C]``), e.g. a sigmoid.
        check_labels: raises :class:`DataError` when finite labels are outside the allowed range
            (:meth:`TaskSpec.check_labels` adds the class range of a task with ``num_classes``).
        metrics: metric names (see ``mtlkit.training.metrics``) reported for this type; the first
            is the one early stopping and reports treat as primary.
        higher_is_better: for the primary metric.
        elementwise_loss: whether ``loss`` is computed element by element over any leading
            dimensions, so that tasks of this type are scored together in one pass over their
            stacked outputs (:class:`TaskOutputs`). Leave it False for a loss that reduces over
            a dimension or reads the output's shape.
        metric_scale_powers: for a target on an arbitrary numeric scale (regression), how each
            metric grows when the labels are multiplied by ``s``: ``{"mse": 2, "mae": 1}`` means
            ``s**2`` and ``s``. Tables standardise such labels for training
            (``TableSchema.standardize_labels``) and report these metrics in the labels' own units.
            None (binary): labels are never rescaled.
        metrics_on_predictions: the metrics read ``predict(output)`` (a Poisson task's rate) rather
            than the raw output (a logit, a log-rate).
        label_scaling: how tables put labels with ``metric_scale_powers`` on a common scale:
            ``"standard"`` (``(label - mean) / std``, regression) or ``"geometric"`` (``label / g``,
            ``g`` the geometric mean of the positive training labels: zeros stay zeros and a
            lognormal's location starts near 0, ``ziln``).
        side_predictions: named predictions besides ``predict``'s, ``output [B, output_dim] -> [B]``,
            each never rescaled: ``{"p_positive": ...}`` makes a ``ziln`` task ``spend`` also predict
            ``spend_p_positive``, the probability of an amount above 0 (of a count above 0 for ``poisson``).
        metric_scores: for metrics that read something else than the others do, what they read:
            ``raw output [N, output_dim] -> scores [N]`` (``ziln``'s ``positive_auc`` reads the
            logit of a positive amount, where its other metrics read the predicted mean; ``poisson``'s
            the log-rate).
    """

    name: str
    output_dim: int | None
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    predict: Callable[[torch.Tensor], torch.Tensor]
    check_labels: Callable[[torch.Tensor, str], None]
    metrics: tuple[str, ...]
    higher_is_better: bool
    elementwise_loss: bool = False
    metric_scale_powers: Mapping[str, int] | None = field(default=None, compare=False)  # a dict: kept out of the hash
    metrics_on_predictions: bool = False
    label_scaling: str = "standard"
    side_predictions: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict, compare=False)
    metric_scores: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.label_scaling not in ("standard", "geometric"):
            raise ValueError(f"task type {self.name!r}: label_scaling must be 'standard' or 'geometric', got {self.label_scaling!r}")


_TASK_TYPES: dict[str, TaskType] = {}


def register_task_type(task_type: TaskType) -> TaskType:
    """Add a task type to the registry (overwriting one of the same name is an error)."""
    if task_type.name in _TASK_TYPES:
        raise ValueError(f"task type {task_type.name!r} is already registered")
    _TASK_TYPES[task_type.name] = task_type
    return task_type


def get_task_type(name: str) -> TaskType:
    """Look up a task type by name; unknown names raise a :class:`ConfigError` listing the known ones."""
    try:
        return _TASK_TYPES[name]
    except KeyError:
        raise ConfigError(
            f"unknown task type {name!r}; expected one of {sorted(_TASK_TYPES)}"
        ) from None


def list_task_types() -> list[str]:
    """Names of all registered task types."""
    return sorted(_TASK_TYPES)


def _binary_loss(output: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(output[..., 0], label, reduction="none")


def _check_binary(label: torch.Tensor, where: str) -> None:
    finite = label[torch.isfinite(label)]
    bad = (finite != 0) & (finite != 1)
    if bool(bad.any()):
        example = finite[bad][:3].tolist()
        raise DataError(f"{where}: a binary task needs labels in {{0, 1}}, found {example}")


def _regression_loss(output: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    # One autograd node where (output - label) ** 2 makes two; the same numbers, forward and backward.
    return F.mse_loss(output[..., 0], label, reduction="none")


def _check_nothing(label: torch.Tensor, where: str) -> None:
    return None


register_task_type(
    TaskType(
        name="binary",
        output_dim=1,
        loss=_binary_loss,
        predict=lambda output: torch.sigmoid(output[:, 0]),
        check_labels=_check_binary,
        metrics=("auc", "logloss", "ne", "calibration"),
        higher_is_better=True,
        elementwise_loss=True,
    )
)


def _multiclass_loss(output: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, label.long(), reduction="none")


def _check_class_indices(label: torch.Tensor, where: str) -> None:
    finite = label[torch.isfinite(label)]
    bad = (finite < 0) | (finite != finite.round())
    if bool(bad.any()):
        example = finite[bad][:3].tolist()
        raise DataError(f"{where}: a multiclass task needs class indices 0, 1, ..., num_classes - 1, found {example}")


register_task_type(
    TaskType(
        name="multiclass",
        output_dim=None,
        loss=_multiclass_loss,
        predict=lambda output: torch.softmax(output, dim=1),
        check_labels=_check_class_indices,
        metrics=("accuracy", "logloss"),
        higher_is_better=True,
    )
)
_REGRESSION = register_task_type(
    TaskType(
        name="regression",
        output_dim=1,
        loss=_regression_loss,
        predict=lambda output: output[:, 0],
        check_labels=_check_nothing,
        metrics=("mse", "mae"),
        higher_is_better=False,
        elementwise_loss=True,
        metric_scale_powers={"mse": 2, "mae": 1},
    )
)


def _huber_loss(output: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return F.huber_loss(output[..., 0], label, reduction="none", delta=1.0)


# Regression in every respect but the loss: the same head, predictions, metrics and standardisation.
register_task_type(dataclasses.replace(_REGRESSION, name="huber", loss=_huber_loss))


def _poisson_loss(output: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    # exp(o) - y * o: the negative log-likelihood without its label-only term (log y!).
    return F.poisson_nll_loss(output[..., 0], label, log_input=True, full=False, reduction="none")


def _non_negative_labels(requirement: str) -> Callable[[torch.Tensor, str], None]:
    """A ``check_labels`` that refuses negative labels, saying ``requirement`` ("a poisson task needs counts >= 0")."""
    def check(label: torch.Tensor, where: str) -> None:
        finite = label[torch.isfinite(label)]
        if bool((finite < 0).any()):
            raise DataError(f"{where}: {requirement}, found {finite[finite < 0][:3].tolist()}")
    return check


def _first_output(output: torch.Tensor) -> torch.Tensor:
    """A logit or log-rate, monotone in the probability of a positive label (what an AUC needs)."""
    return output[..., 0]


register_task_type(
    TaskType(
        name="poisson",
        output_dim=1,
        loss=_poisson_loss,
        predict=lambda output: torch.exp(output[:, 0]),
        check_labels=_non_negative_labels("a poisson task needs counts >= 0"),
        metrics=("deviance", "positive_auc", "mae"),
        higher_is_better=False,
        elementwise_loss=True,
        metrics_on_predictions=True,
        # P(count > 0) = 1 - exp(-rate): whether a user buys at all, beside how often.
        side_predictions={"p_positive": lambda output: -torch.expm1(-torch.exp(output[:, 0]))},
        metric_scores={"positive_auc": _first_output},
    )
)


# softplus's floor for the lognormal scale: the reference implementation's sqrt(Keras epsilon).
_ZILN_MIN_SCALE = math.sqrt(1e-7)


def _ziln_parameters(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A ``ziln`` head's ``(..., 3)`` output as (logit of a positive amount, lognormal loc, lognormal scale)."""
    return output[..., 0], output[..., 1], F.softplus(output[..., 2]).clamp_min(_ZILN_MIN_SCALE)


def _ziln_loss(output: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    # Binary cross-entropy of "amount > 0" plus, on positive amounts, the lognormal's negative
    # log-likelihood (Wang, Liu & Miao 2019), label-only term log y included so the value is the
    # exact NLL of the mixture's continuous part. Zero labels read log 1 so no NaN reaches autograd.
    logit, loc, scale = _ziln_parameters(output)
    positive = label > 0
    log_label = torch.log(torch.where(positive, label, torch.ones_like(label)))
    lognormal = log_label + torch.log(scale) + 0.5 * math.log(2 * math.pi) + 0.5 * ((log_label - loc) / scale) ** 2
    return F.binary_cross_entropy_with_logits(logit, positive.to(output.dtype), reduction="none") + positive * lognormal


def _ziln_mean(output: torch.Tensor) -> torch.Tensor:
    logit, loc, scale = _ziln_parameters(output)
    return torch.sigmoid(logit) * torch.exp(loc + 0.5 * scale**2)


register_task_type(
    TaskType(
        name="ziln",
        output_dim=3,
        loss=_ziln_loss,
        predict=_ziln_mean,
        check_labels=_non_negative_labels("a ziln task needs amounts >= 0"),
        metrics=("gini", "positive_auc", "mae", "mse"),
        higher_is_better=True,
        elementwise_loss=True,
        metric_scale_powers={"mae": 1, "mse": 2},  # the Gini and the AUC only rank: unchanged by a scale
        metrics_on_predictions=True,
        label_scaling="geometric",
        # Who spends at all is a target of its own (a purchase, a return), which the mean mixes with how much.
        side_predictions={"p_positive": lambda output: torch.sigmoid(output[:, 0])},
        metric_scores={"positive_auc": _first_output},
    )
)

class StackedDict(dict):
    """``{name: view}`` whose values are views of one stacked tensor, which it keeps.

    The stack is handed back (:meth:`stack_if_unchanged`) only while every value is still the view it
    was built with, so code that replaces a value never has its change ignored by a consumer that
    reads the stack. It is an ordinary dict for every other purpose.
    """

    def __init__(self, stack: torch.Tensor, names: Sequence[str], views: Sequence[torch.Tensor]) -> None:
        super().__init__(zip(names, views))
        self._stack, self._names, self._views = stack, tuple(names), tuple(views)

    def stack_if_unchanged(self, names: Sequence[str]) -> torch.Tensor | None:
        """The stack when its entries are ``names`` in this order and no value was replaced; else None."""
        if tuple(names) != self._names or any(self.get(n) is not v for n, v in zip(self._names, self._views)):
            return None
        return self._stack


class TaskOutputs(StackedDict):
    """A model's ``{task: (B, output_dim)}`` whose values are slices of one stacked output.

    Models whose heads run as one batched op (:class:`~mtlkit.models.towers.TaskTowers`) return this
    instead of a plain dict, so that the losses of tasks of one type can be computed in one pass over
    the stack (:func:`~mtlkit.objectives.task_losses`). It is an ordinary dict for every other purpose.

    Args:
        stacked: ``(K, B, width)``, any strides; task ``k``'s output is ``stacked[k, :, :dim_k]``.
        names: the ``K`` task names, in stack order.
        output_dims: each task's output width (``<= width``).
    """

    def __init__(self, stacked: torch.Tensor, names: Sequence[str], output_dims: Sequence[int]) -> None:
        width = stacked.shape[2]
        super().__init__(stacked, names, [stacked[k] if dim == width else stacked[k, :, :dim] for k, dim in enumerate(output_dims)])
        self._full_width = all(dim == width for dim in output_dims)

    def float(self) -> "TaskOutputs":
        """The same outputs in float32, still one stack (the losses' one-pass path stays open)."""
        return TaskOutputs(self._stack.float(), self._names, [v.shape[-1] for v in self._views])

    def stacked_for(self, names: Sequence[str]) -> torch.Tensor | None:
        """The ``(K, B, width)`` stack when its tasks are ``names`` in this order, every task's output is
        the stack's full width, and no value has been replaced since; otherwise None."""
        return self.stack_if_unchanged(names) if self._full_width else None


def in_float32(outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model's outputs in float32 (after a forward under autocast), stacked ones kept stacked."""
    if isinstance(outputs, TaskOutputs):
        return outputs.float()
    return {name: value.float() for name, value in outputs.items()}


@dataclass(frozen=True)
class TaskSpec:
    """One prediction target.

    Args:
        name: unique task name; model outputs, losses and metrics are keyed by it.
        type: a registered task type (``"binary"``, ``"regression"``, ...).
        label: the label column in a table (defaults to ``name``).
        weight: fixed weight of this task's loss in the joint objective (>= 0).
        sample_space: optional column marking the rows where this task is defined (value 1); other
            rows count as unlabelled for it (the PLE paper's per-task sample space; ESMM's CVR task is
            defined on clicked rows: ``sample_space="click"``).
        num_classes: the number of classes of a ``multiclass`` task (>= 2), whose labels are the
            class indices ``0 .. num_classes - 1``; only for such task types.
    """

    name: str
    type: str = "binary"
    label: str | None = None
    weight: float = 1.0
    sample_space: str | None = None
    num_classes: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"task name must be a non-empty string, got {self.name!r}")
        task_type = get_task_type(self.type)
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight >= 0):
            raise ConfigError(f"task {self.name!r}: weight must be a finite number >= 0, got {self.weight!r}")
        if task_type.output_dim is None:
            if not (isinstance(self.num_classes, int) and not isinstance(self.num_classes, bool) and self.num_classes >= 2):
                raise ConfigError(f"task {self.name!r}: a {self.type} task needs num_classes, a whole number >= 2, "
                                  f"got {self.num_classes!r}")
        elif self.num_classes is not None:
            raise ConfigError(f"task {self.name!r}: num_classes is for multiclass tasks, not {self.type}")

    @property
    def label_column(self) -> str:
        """The table column holding this task's label."""
        return self.label or self.name

    @property
    def task_type(self) -> TaskType:
        """The registered :class:`TaskType` of this task."""
        return get_task_type(self.type)

    @property
    def output_dim(self) -> int:
        """Width of this task's raw model output."""
        return self.task_type.output_dim or self.num_classes

    def check_labels(self, label: torch.Tensor, where: str) -> None:
        """Raise a :class:`DataError` naming ``where`` when a finite label is not one this task can take."""
        self.task_type.check_labels(label, where)
        if self.num_classes is not None:
            finite = label[torch.isfinite(label)]
            beyond = finite[finite >= self.num_classes]
            if beyond.numel():
                raise DataError(f"{where}: task {self.name!r} has num_classes {self.num_classes}, so its labels are "
                                f"0 .. {self.num_classes - 1}; found {beyond[:3].tolist()}")

    def to_dict(self) -> dict:
        """Plain-data form, for configs and checkpoints (``num_classes`` only where set)."""
        out = {"name": self.name, "type": self.type, "label": self.label, "weight": self.weight,
               "sample_space": self.sample_space}
        if self.num_classes is not None:
            out["num_classes"] = self.num_classes
        return out

    @classmethod
    def from_dict(cls, data: dict | "TaskSpec") -> "TaskSpec":
        """Build from plain data; unknown keys are an error that names them."""
        if isinstance(data, TaskSpec):
            return data
        if not isinstance(data, dict):
            raise ConfigError(f"a task must be a mapping with keys {', '.join(_TASK_KEYS)}, got {data!r}")
        unknown = set(data) - set(_TASK_KEYS)
        if unknown:
            raise ConfigError(f"task {data.get('name')!r}: unknown key(s) {sorted(unknown)}; expected {', '.join(_TASK_KEYS)}")
        if "name" not in data:
            raise ConfigError(f"task {data!r} is missing the key 'name'")
        return cls(**data)


_TASK_KEYS = ("name", "type", "label", "weight", "sample_space", "num_classes")


def validate_tasks(tasks) -> tuple[TaskSpec, ...]:
    """Normalise a sequence of tasks (specs, dicts or names) and check that names are unique."""
    if isinstance(tasks, (str, TaskSpec, dict)):
        tasks = [tasks]
    specs = tuple(TaskSpec(name=t) if isinstance(t, str) else TaskSpec.from_dict(t) for t in tasks)
    if not specs:
        raise ConfigError("tasks: at least one task is required")
    names = [t.name for t in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"tasks: task names must be unique, repeated: {duplicates}")
    for task in specs:
        for suffix in task.task_type.side_predictions:
            if f"{task.name}_{suffix}" in names:
                raise ConfigError(f"tasks: {task.type} task {task.name!r} also predicts {task.name}_{suffix}, "
                                  "the name of another task; rename that task")
    return specs
