"""Loss weighting: how per-task losses become one objective.

A weighting receives ``{task: loss}`` and returns the total plus the weights it used (for logging).
The trainer holds one by composition; new schemes register with :func:`register_weighting`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from mtlkit.errors import ConfigError
from mtlkit.objectives.losses import TaskLosses
from mtlkit.tasks import TaskSpec

__all__ = [
    "LossWeighting", "FixedWeighting", "DynamicWeighting", "UncertaintyWeighting",
    "register_weighting", "build_weighting", "list_weightings",
]


class LossWeighting(nn.Module):
    """Base class. ``forward(losses) -> (total, {task: weight})``."""

    def __init__(self, tasks: Sequence[TaskSpec]) -> None:
        super().__init__()
        self.task_names = [t.name for t in tasks]

    def forward(self, losses: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        raise NotImplementedError

    def on_epoch_end(self, epoch: int) -> None:
        """Called by the trainer after every epoch (for schedules)."""


class FixedWeighting(LossWeighting):
    """``L = sum_k w_k L_k`` with each task's ``TaskSpec.weight`` (1 by default: equal weights)."""

    def __init__(self, tasks: Sequence[TaskSpec]) -> None:
        super().__init__(tasks)
        self.weights = {t.name: float(t.weight) for t in tasks}

    def forward(self, losses):
        vector = losses.vector_for(self.task_names) if isinstance(losses, TaskLosses) else None
        if vector is not None and all(w == 1.0 for w in self.weights.values()):
            return vector.sum(), dict(self.weights)
        terms = [losses[name] if self.weights[name] == 1.0 else self.weights[name] * losses[name]
                 for name in self.task_names if self.weights[name] != 0.0]
        total = terms[0] if terms else 0.0 * next(iter(losses.values()))
        for term in terms[1:]:  # no "0 +" start value: one op fewer per step
            total = total + term
        return total, dict(self.weights)


class DynamicWeighting(FixedWeighting):
    """The PLE paper's schedule ``w_k(t) = w_k0 * gamma_k ** t`` with ``t`` the epoch.

    Args:
        gamma: one decay factor for all tasks or ``{task: gamma}``.
    """

    def __init__(self, tasks: Sequence[TaskSpec], gamma: float | Mapping[str, float] = 1.0) -> None:
        super().__init__(tasks)
        gammas = gamma if isinstance(gamma, Mapping) else {name: gamma for name in self.task_names}
        unknown = sorted(set(gammas) - set(self.task_names))
        if unknown:
            raise ConfigError(f"weighting.gamma: unknown task(s) {unknown}; tasks are {self.task_names}")
        for name, value in gammas.items():
            if not (isinstance(value, (int, float)) and value > 0):
                raise ConfigError(f"weighting.gamma[{name!r}]: expected a number > 0, got {value!r}")
        self.gammas = {name: float(gammas.get(name, 1.0)) for name in self.task_names}
        self.initial = dict(self.weights)

    def on_epoch_end(self, epoch: int) -> None:
        self.weights = {name: self.initial[name] * self.gammas[name] ** (epoch + 1) for name in self.task_names}


class UncertaintyWeighting(LossWeighting):
    """Homoscedastic-uncertainty weighting (Kendall et al., 2018): ``sum_k exp(-s_k) L_k + s_k``.

    ``s_k`` are learned; the trainer optimises them with the model (they are parameters of this module).
    """

    def __init__(self, tasks: Sequence[TaskSpec]) -> None:
        super().__init__(tasks)
        self.log_variance = nn.Parameter(torch.zeros(len(tasks)))

    def forward(self, losses):
        total = 0.0
        weights: dict[str, float | torch.Tensor] = {}
        for k, name in enumerate(self.task_names):
            precision = torch.exp(-self.log_variance[k])
            total = total + precision * losses[name] + self.log_variance[k]
            weights[name] = precision.detach()
        return total, weights


_WEIGHTINGS: dict[str, Callable[..., LossWeighting]] = {}


def register_weighting(name: str, factory: Callable[..., LossWeighting]) -> None:
    """Register a weighting factory ``factory(tasks, **options)`` under ``name``."""
    if name in _WEIGHTINGS:
        raise ValueError(f"weighting {name!r} is already registered")
    _WEIGHTINGS[name] = factory


def list_weightings() -> list[str]:
    return sorted(_WEIGHTINGS)


def build_weighting(name: str, tasks: Sequence[TaskSpec], **options: Any) -> LossWeighting:
    """Build a registered weighting; unknown names and options are errors that name them."""
    if name not in _WEIGHTINGS:
        raise ConfigError(f"weighting: unknown {name!r}; expected one of {list_weightings()}")
    try:
        return _WEIGHTINGS[name](tasks, **options)
    except TypeError as error:
        raise ConfigError(f"weighting {name!r}: bad options {sorted(options)} ({error})") from None


register_weighting("fixed", FixedWeighting)
register_weighting("dynamic", DynamicWeighting)
register_weighting("uncertainty", UncertaintyWeighting)
