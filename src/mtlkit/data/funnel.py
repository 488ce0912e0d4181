"""A synthetic conversion funnel: impression -> click -> ... -> purchase, each step only after the last.

For ``K`` steps with weight vectors ``w_t`` whose cosine similarities are ``relatedness`` (built as in
:mod:`mtlkit.data.synthetic`) and ``x ~ N(0, I_d)``:

``s_t(x) = b_t + w_t . x + sum_i sin(alpha_i w_t . x + beta_i)``, the step's log-odds given the one
before; ``e_1 ~ Bernoulli(sigmoid(s_1))`` and ``e_t = e_{t-1} * Bernoulli(sigmoid(s_t))``.

So ``P(e_t = 1 | x) = prod_{j <= t} sigmoid(s_j(x))``: later steps are rarer and never happen without
the earlier ones, the set-up of ESMM and AITM. Each ``b_t`` is solved so that the mean of
``sigmoid(s_t)`` over the generated rows equals the requested ``step_rates[t]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from mtlkit.configuration import check_count
from mtlkit.data.synthetic import correlation_matrix, related_weight_vectors
from mtlkit.data.tensors import MultiTaskTensors, random_row_splits
from mtlkit.errors import ConfigError
from mtlkit.tasks import TaskSpec

__all__ = ["FunnelData", "make_funnel"]


@dataclass
class FunnelData:
    """A generated funnel.

    Attributes:
        inputs: ``(N, d)`` float32.
        labels: ``(N, K)`` float32 0/1 events, ``labels[:, t] <= labels[:, t - 1]``.
        probabilities: ``(N, K)`` float64, the true ``P(e_t = 1 | x)`` (the best any model can score).
        tasks: one binary task per step, named after the steps.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    probabilities: np.ndarray
    tasks: tuple[TaskSpec, ...]

    def to_tensors(self) -> MultiTaskTensors:
        """As :class:`MultiTaskTensors` for training."""
        return MultiTaskTensors(self.inputs, self.labels, [t.name for t in self.tasks])

    def subset(self, rows: torch.Tensor) -> "FunnelData":
        """The rows ``rows`` (indices), with their true probabilities."""
        return FunnelData(self.inputs[rows], self.labels[rows], self.probabilities[rows.numpy()], self.tasks)

    def split(self, fractions: Sequence[float], seed: int = 0) -> list["FunnelData"]:
        """Random disjoint splits with the given fractions of the rows, as :meth:`MultiTaskTensors.split`
        cuts them (the same rows for the same seed)."""
        return [self.subset(rows) for rows in random_row_splits(len(self.inputs), fractions, seed)]


def _bias_for_rate(logits: np.ndarray, rate: float) -> float:
    """``b`` with ``mean(sigmoid(logits + b)) == rate`` (bisection: the mean is increasing in ``b``)."""
    low, high = -40.0, 40.0
    for _ in range(100):
        middle = (low + high) / 2
        if (1 / (1 + np.exp(-(logits + middle)))).mean() < rate:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def make_funnel(steps: Sequence[str] = ("click", "purchase"), step_rates: Sequence[float] = (0.2, 0.1),
                relatedness: float = 0.5, num_rows: int = 100_000, input_dim: int = 32, scale: float = 1.5,
                num_sine_terms: int = 5, seed: int = 0) -> FunnelData:
    """Generate a conversion funnel (see the module docstring).

    Args:
        steps: the steps' names, in funnel order (at least one).
        step_rates: for each step, the mean probability of the event given the step before (the
            first: given an impression), in (0, 1).
        relatedness: cosine similarity of every two steps' weight vectors, in [-1, 1].
        num_rows, input_dim: rows and input width (``input_dim >= len(steps)``).
        scale: norm of every ``w_t``: how much the input tells about each step.
        num_sine_terms: non-linear terms per step (0: logistic in ``x``).
        seed: same seed, same numbers.

    Example::

        >>> data = make_funnel(("click", "cart", "buy"), (0.2, 0.3, 0.3), num_rows=1000)
        >>> bool((data.labels[:, 1:] <= data.labels[:, :-1]).all())
        True
    """
    names = [str(s) for s in steps]
    k = len(names)
    if k < 1 or len(set(names)) != k:
        raise ConfigError(f"steps: expected distinct step names, got {names}")
    rates = [float(r) for r in step_rates]
    if len(rates) != k or not all(0 < r < 1 for r in rates):
        raise ConfigError(f"step_rates: expected {k} numbers in (0, 1), one per step {names}, got {list(step_rates)}")
    check_count(num_rows, "num_rows", 2)
    check_count(num_sine_terms, "num_sine_terms", 0)
    if not isinstance(input_dim, int) or input_dim < k:
        raise ConfigError(f"input_dim: needs an integer >= the number of steps ({k}), got {input_dim!r}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 0):
        raise ConfigError(f"scale: expected a finite number >= 0, got {scale!r}")
    target = correlation_matrix(relatedness, k)

    rng = np.random.default_rng(seed)
    weights = related_weight_vectors(target, input_dim, scale, rng)  # [K, d]
    alpha = rng.normal(0.0, 1.0, size=num_sine_terms)
    beta = rng.normal(0.0, 1.0, size=num_sine_terms)
    x = rng.standard_normal((num_rows, input_dim))
    projection = x @ weights.T  # [N, K]
    logits = projection + np.sin(projection[..., None] * alpha + beta).sum(-1)
    biases = [_bias_for_rate(logits[:, t], rates[t]) for t in range(k)]
    step_probability = 1 / (1 + np.exp(-(logits + np.array(biases))))
    events = rng.random((num_rows, k)) < step_probability
    labels = np.cumprod(events, axis=1)  # a step happens only after every one before it
    tasks = tuple(TaskSpec(name=n, type="binary") for n in names)
    return FunnelData(inputs=torch.from_numpy(x.astype(np.float32)), labels=torch.from_numpy(labels.astype(np.float32)),
                      probabilities=np.cumprod(step_probability, axis=1), tasks=tasks)
