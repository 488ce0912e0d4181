"""Gradient surgery: combining the tasks' gradients other than by summing them.

With a loss weighting the update follows ``grad sum_k w_k L_k``, so where two tasks' gradients point
in conflicting directions on the shared parameters, the larger one wins and the other task is
pulled backwards (negative transfer). A surgery takes each task's own gradient of ``w_k L_k``,
flattened over all trainable parameters, ``(K, P)``, and returns the one gradient the optimizer
steps, ``(P,)``. It costs one backward pass per task instead of one in all.

New methods register with :func:`register_gradient_surgery`; ``TrainerConfig.gradient_surgery``
names one.
"""

from __future__ import annotations

from typing import Callable

import torch

from mtlkit.errors import ConfigError

__all__ = ["pcgrad", "register_gradient_surgery", "get_gradient_surgery", "list_gradient_surgeries"]

GradientSurgery = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def pcgrad(grads: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """PCGrad ("projecting conflicting gradients", Yu et al., NeurIPS 2020).

    Each task's gradient ``g_i``, wherever it conflicts with another task's original gradient
    ``g_j`` (``g_i . g_j < 0``), loses its component along ``g_j``; the other tasks are visited in
    a random order per task (drawn from ``generator``). The projected gradients are summed, so
    tasks that never conflict get exactly the summed gradient of ``sum_k w_k L_k``.

    Shape: ``grads`` ``(K, P)`` -> ``(P,)``.
    """
    num_tasks = grads.shape[0]
    squared_norms = (grads * grads).sum(1)
    projected = grads.clone()
    for i in range(num_tasks):
        for j in torch.randperm(num_tasks, generator=generator).tolist():
            if j == i or squared_norms[j] == 0:
                continue
            dot = torch.dot(projected[i], grads[j])
            if dot < 0:
                projected[i] -= (dot / squared_norms[j]) * grads[j]
    return projected.sum(0)


_SURGERIES: dict[str, GradientSurgery] = {"pcgrad": pcgrad}


def register_gradient_surgery(name: str, surgery: GradientSurgery) -> None:
    """Make ``surgery`` (``(grads (K, P), generator) -> (P,)``) available as ``gradient_surgery: name``."""
    if name in _SURGERIES:
        raise ValueError(f"gradient surgery {name!r} is already registered")
    _SURGERIES[name] = surgery


def get_gradient_surgery(name: str) -> GradientSurgery:
    """The registered surgery called ``name``; an unknown name is a :class:`ConfigError` listing the known ones."""
    try:
        return _SURGERIES[name]
    except KeyError:
        raise ConfigError(f"training.gradient_surgery: unknown {name!r}; expected one of {sorted(_SURGERIES)} or null") from None


def list_gradient_surgeries() -> list[str]:
    """Names of the registered gradient surgeries."""
    return sorted(_SURGERIES)
