"""Post-hoc calibration of a binary task's probabilities: Platt scaling or isotonic regression of
its logit.

A model trained for ranking (AUC) can rank well and still predict rates that are off, for example
after negative sampling or on a shifted period; auctions and expected-value formulas need the rates
themselves. Platt scaling fits ``p = sigmoid(scale * logit + shift)`` on held-out labelled rows: two
numbers per task, monotone (``scale > 0``), so the ranking, and with it the AUC, is unchanged.
Isotonic regression fits any non-decreasing map from the logit to the probability (knots joined by
straight lines): it corrects distortions no sigmoid can, needs more rows to do so without
overfitting, and its flat steps tie rows, which can move the AUC a little.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtlkit.errors import ConfigError, DataError

__all__ = ["fit_platt_scaling", "fit_isotonic_calibration"]


def _labelled_rows(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None, where: str,
                   method: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, labels and weights as flat float64 tensors, after checking that both classes have rows of
    positive weight (a calibration from one class is meaningless)."""
    z, y = logits.detach().double().reshape(-1), labels.detach().double().reshape(-1)
    w = torch.ones_like(y) if weight is None else weight.detach().double().reshape(-1)
    if z.numel() == 0 or not bool(((y == 1) & (w > 0)).any()) or not bool(((y == 0) & (w > 0)).any()):
        raise DataError(f"{where}: {method} needs labelled rows of both classes, got {int((y == 1).sum())} positive "
                        f"and {int((y == 0).sum())} negative")
    return z, y, w


def fit_platt_scaling(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None,
                      where: str = "calibration") -> tuple[float, float]:
    """``(scale, shift)`` minimising the (weighted) log loss of ``sigmoid(scale * logits + shift)``.

    Fitted in float64 by L-BFGS from the identity ``(1, 0)``; deterministic. Needs both classes.

    Args:
        logits: ``(N,)`` the model's raw outputs for the task.
        labels: ``(N,)`` 0/1.
        weight: optional ``(N,)`` row weights (the schema's ``weight_column``).
        where: names the task in errors.
    """
    z, y, w = _labelled_rows(logits, labels, weight, where, "Platt scaling")
    params = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([params], lr=1.0, max_iter=200, tolerance_grad=1e-10, tolerance_change=1e-14,
                                  line_search_fn="strong_wolfe")
    total = w.sum()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (F.binary_cross_entropy_with_logits(params[0] * z + params[1], y, reduction="none") * w).sum() / total
        loss.backward()
        return loss

    optimizer.step(closure)
    scale, shift = (float(v) for v in params.detach())
    if not (scale == scale and shift == shift):
        raise DataError(f"{where}: Platt scaling did not converge (scale {scale}, shift {shift})")
    return scale, shift


def fit_isotonic_calibration(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None,
                             where: str = "calibration") -> tuple[list[float], list[float]]:
    """The knots ``(logits ascending, probabilities non-decreasing)`` of the (weighted) isotonic
    regression of the labels on the logits (scikit-learn's pool-adjacent-violators), for
    :class:`~mtlkit.models.IsotonicCalibration`: between knots it interpolates linearly, beyond the
    first and last it holds their probability. Deterministic. Needs both classes.

    Args as :func:`fit_platt_scaling`'s.
    """
    try:
        from sklearn.isotonic import IsotonicRegression
    except ImportError:  # scikit-learn is in requirements.txt, not in the package's own dependencies
        raise ConfigError("isotonic calibration needs scikit-learn: pip install scikit-learn") from None
    z, y, w = _labelled_rows(logits, labels, weight, where, "isotonic calibration")
    fitted = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
    fitted.fit(z.numpy(), y.numpy(), sample_weight=w.numpy())
    return fitted.X_thresholds_.tolist(), fitted.y_thresholds_.tolist()
