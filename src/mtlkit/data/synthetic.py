"""The MMoE paper's synthetic generator, with controlled task relatedness, for any number of tasks.

Recipe (Ma et al., KDD 2018, section 3.2), generalised from 2 to K tasks:

1. Draw K orthonormal vectors ``u_1..u_K`` in ``R^d``.
2. Factor the target cosine-similarity matrix ``C = L L^T`` (Cholesky, allowing rank deficiency so
   ``p = 1`` works) and set ``w_k = c * sum_j L[k, j] u_j``; then ``cos(w_i, w_j) = C[i, j]``. For K = 2
   and ``C = [[1, p], [p, 1]]`` this is exactly ``w1 = c u1``, ``w2 = c (p u1 + sqrt(1 - p^2) u2)``.
3. Draw ``x ~ N(0, I_d)``.
4. ``y_k = w_k . x + sum_{i=1..m} sin(alpha_i w_k . x + beta_i) + noise``, with the same
   ``alpha_i, beta_i`` for every task.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from mtlkit.data.tensors import MultiTaskTensors
from mtlkit.errors import ConfigError
from mtlkit.tasks import TaskSpec

__all__ = ["SyntheticConfig", "SyntheticData", "SYNTHETIC_PRESETS", "make_synthetic", "correlation_matrix",
           "related_weight_vectors"]


@dataclass
class SyntheticConfig:
    """Parameters of the generator.

    Args:
        correlation: target cosine similarity of the task weight vectors: a number ``p`` in [-1, 1]
            (two tasks, or ``num_tasks`` tasks that all share ``p``), or a full ``K x K`` matrix with
            unit diagonal that is positive semi-definite.
        num_tasks: number of tasks when ``correlation`` is a number (default 2).
        num_rows: rows to generate.
        input_dim: ``d``, the input width (needs ``d >= K``).
        scale: ``c``, the norm of every ``w_k``.
        num_sine_terms: ``m``; 0 gives purely linear tasks whose label correlation equals the target.
        alpha_std, beta_std: ``alpha_i ~ N(0, alpha_std^2)``, ``beta_i ~ N(0, beta_std^2)``.
        noise_std: standard deviation of the label noise (the paper's "N(0, 0.01)" is ambiguous; a
            std of 0.1 follows the common reimplementation).
        seed: seeds the directions, the sine parameters, the inputs and the noise.
    """

    correlation: float | Sequence[Sequence[float]] = 0.5
    num_tasks: int = 2
    num_rows: int = 12_000
    input_dim: int = 100
    scale: float = 1.0
    num_sine_terms: int = 10
    alpha_std: float = 1.0
    beta_std: float = 1.0
    noise_std: float = 0.1
    seed: int = 0

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "SyntheticConfig":
        """A named preset (``"mmoe"`` or ``"ple"``) with optional overrides."""
        if name not in SYNTHETIC_PRESETS:
            raise ConfigError(f"synthetic preset: unknown {name!r}; expected one of {sorted(SYNTHETIC_PRESETS)}")
        return cls(**{**SYNTHETIC_PRESETS[name], **overrides})


# mmoe: the MMoE paper's synthetic set-up (d = 100; its network sizes are in the experiment). The paper
# leaves c, m, alpha and beta open; we take the PLE paper's c = 1, m = 10, alpha, beta ~ N(0, 1).
# ple: the PLE paper's values (d = 512, 1.4 M rows per correlation).
SYNTHETIC_PRESETS: dict[str, dict[str, Any]] = {
    "mmoe": dict(input_dim=100, scale=1.0, num_sine_terms=10, alpha_std=1.0, beta_std=1.0, noise_std=0.1, num_rows=12_000),
    "ple": dict(input_dim=512, scale=1.0, num_sine_terms=10, alpha_std=1.0, beta_std=1.0, noise_std=0.1, num_rows=1_400_000),
}


@dataclass
class SyntheticData:
    """Generated data plus what was achieved.

    Attributes:
        inputs: ``(N, d)`` float32.
        labels: ``(N, K)`` float32.
        task_weights: ``(K, d)`` the ``w_k`` vectors (float64).
        target_correlation: ``(K, K)`` the requested cosine matrix.
        label_correlation: ``(K, K)`` Pearson correlation of the generated labels.
        tasks: regression tasks ``y1..yK``.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    task_weights: np.ndarray
    target_correlation: np.ndarray
    label_correlation: np.ndarray
    tasks: tuple[TaskSpec, ...]

    def to_tensors(self) -> MultiTaskTensors:
        """As :class:`MultiTaskTensors` for training."""
        return MultiTaskTensors(self.inputs, self.labels, [t.name for t in self.tasks])


def correlation_matrix(correlation: float | Sequence[Sequence[float]], num_tasks: int = 2) -> np.ndarray:
    """Validate and expand ``correlation`` to a ``K x K`` matrix (see :class:`SyntheticConfig`)."""
    if isinstance(correlation, (int, float)) and not isinstance(correlation, bool):
        p = float(correlation)
        if not (math.isfinite(p) and -1.0 <= p <= 1.0):
            raise ConfigError(f"correlation: expected a number in [-1, 1], got {correlation!r}")
        if not isinstance(num_tasks, int) or num_tasks < 1:
            raise ConfigError(f"num_tasks: expected an integer >= 1, got {num_tasks!r}")
        matrix = np.full((num_tasks, num_tasks), p)
        np.fill_diagonal(matrix, 1.0)
    else:
        try:
            matrix = np.asarray(correlation, dtype=np.float64)
        except (TypeError, ValueError):
            raise ConfigError(f"correlation: expected a number or a square matrix, got {correlation!r}") from None
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 1:
            raise ConfigError(f"correlation: a matrix must be square K x K, got shape {matrix.shape}")
        if not np.all(np.isfinite(matrix)):
            raise ConfigError("correlation: the matrix has non-finite entries")
        if not np.allclose(matrix, matrix.T, atol=1e-12):
            raise ConfigError("correlation: the matrix must be symmetric")
        if not np.allclose(np.diag(matrix), 1.0):
            raise ConfigError(f"correlation: the diagonal must be all 1, got {np.diag(matrix).tolist()}")
        if np.any(np.abs(matrix) > 1.0 + 1e-12):
            raise ConfigError("correlation: every entry must lie in [-1, 1]")
    eigenvalues = np.linalg.eigvalsh(matrix)
    if eigenvalues.min() < -1e-9:
        raise ConfigError(
            f"correlation: the matrix is not positive semi-definite (smallest eigenvalue {eigenvalues.min():.4g}); "
            "no set of vectors has these cosine similarities"
        )
    return matrix


def _semidefinite_cholesky(matrix: np.ndarray) -> np.ndarray:
    """Lower-triangular ``L`` with ``L L^T = matrix`` for a PSD matrix (zero pivots allowed, e.g. p = 1)."""
    k = matrix.shape[0]
    lower = np.zeros_like(matrix)
    for j in range(k):
        pivot = matrix[j, j] - lower[j, :j] @ lower[j, :j]
        lower[j, j] = math.sqrt(max(pivot, 0.0))
        for i in range(j + 1, k):
            off = matrix[i, j] - lower[i, :j] @ lower[j, :j]
            lower[i, j] = off / lower[j, j] if lower[j, j] > 1e-12 else 0.0
    return lower


def related_weight_vectors(target: np.ndarray, input_dim: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """``(K, d)`` vectors of norm ``scale`` whose cosine similarities are ``target`` (``K x K``, PSD,
    unit diagonal): steps 1-2 of the recipe."""
    # Orthonormal directions: QR of a Gaussian matrix gives a uniformly random orthonormal frame.
    directions, _ = np.linalg.qr(rng.standard_normal((input_dim, target.shape[0])))
    return scale * (_semidefinite_cholesky(target) @ directions.T)


def make_synthetic(config: SyntheticConfig | None = None, **overrides: Any) -> SyntheticData:
    """Generate a synthetic multi-task regression dataset (see the module docstring).

    Same ``seed``, same numbers. Example::

        >>> data = make_synthetic(correlation=0.9, num_rows=1000, seed=1)
        >>> data.inputs.shape, data.labels.shape
        (torch.Size([1000, 100]), torch.Size([1000, 2]))
    """
    if config is None:
        config = SyntheticConfig()
    if overrides:
        config = dataclasses.replace(config, **overrides)
    c = config
    target = correlation_matrix(c.correlation, c.num_tasks)
    k = target.shape[0]
    if not isinstance(c.input_dim, int) or c.input_dim < k:
        raise ConfigError(f"input_dim: needs an integer >= the number of tasks ({k}), got {c.input_dim!r}")
    if not isinstance(c.num_rows, int) or c.num_rows < 2:
        raise ConfigError(f"num_rows: expected an integer >= 2, got {c.num_rows!r}")
    if not isinstance(c.num_sine_terms, int) or c.num_sine_terms < 0:
        raise ConfigError(f"num_sine_terms: expected an integer >= 0, got {c.num_sine_terms!r}")
    for key in ("scale", "alpha_std", "beta_std", "noise_std"):
        value = getattr(c, key)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ConfigError(f"{key}: expected a finite number >= 0, got {value!r}")

    rng = np.random.default_rng(c.seed)
    weights = related_weight_vectors(target, c.input_dim, c.scale, rng)
    alpha = rng.normal(0.0, c.alpha_std, size=c.num_sine_terms)
    beta = rng.normal(0.0, c.beta_std, size=c.num_sine_terms)
    x = rng.standard_normal((c.num_rows, c.input_dim))
    projection = x @ weights.T  # [N, K]
    y = projection + np.sin(projection[..., None] * alpha + beta).sum(-1)
    y = y + rng.normal(0.0, c.noise_std, size=y.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        achieved = np.atleast_2d(np.corrcoef(y, rowvar=False))
    tasks = tuple(TaskSpec(name=f"y{i + 1}", type="regression") for i in range(k))
    return SyntheticData(
        inputs=torch.from_numpy(x.astype(np.float32)),
        labels=torch.from_numpy(y.astype(np.float32)),
        task_weights=weights,
        target_correlation=target,
        label_correlation=achieved,
        tasks=tasks,
    )
