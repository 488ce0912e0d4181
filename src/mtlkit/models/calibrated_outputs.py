"""Post-hoc calibration maps applied to a binary task's logit inside the model, so that predict,
evaluate and an exported program all give the calibrated probabilities (the maps are fitted by
:mod:`mtlkit.training.output_calibration`)."""

from __future__ import annotations

from typing import Mapping, Sequence, Union

import torch

__all__ = ["IsotonicCalibration", "OutputCalibration", "apply_output_calibration"]

# Probabilities of exactly 0 or 1 (an isotonic step with no positive, or no negative) as finite logits.
_PROBABILITY_FLOOR = 1e-7


class IsotonicCalibration:
    """A non-decreasing piecewise-linear map from a task's logit to its probability, returned as the
    logit of that probability: knots ``(logits[i], probabilities[i])`` joined by straight lines, and
    the first and last knot's probability held beyond them. Computed in float64 (knots that float32
    would merge stay apart); probabilities of 0 or 1 become logits of ``1e-7`` and ``1 - 1e-7``.

    Shape: ``(B, 1) -> (B, 1)``, the input's dtype.
    """

    def __init__(self, logits: Sequence[float], probabilities: Sequence[float]) -> None:
        x = torch.as_tensor(logits, dtype=torch.float64).reshape(-1)
        y = torch.as_tensor(probabilities, dtype=torch.float64).reshape(-1)
        if x.numel() == 0 or x.shape != y.shape:
            raise ValueError(f"isotonic calibration: expected as many probabilities as logits (at least one), "
                             f"got {y.numel()} and {x.numel()}")
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()) or bool((x[1:] < x[:-1]).any()) \
                or bool((y[1:] < y[:-1]).any()) or bool((y < 0).any() | (y > 1).any()):
            raise ValueError("isotonic calibration: expected finite ascending logits and non-decreasing probabilities in [0, 1]")
        self.logits, self.probabilities = x, y

    def __call__(self, value: torch.Tensor) -> torch.Tensor:
        x, y = self.logits.to(value.device), self.probabilities.to(value.device)
        z = value.double()
        if x.numel() == 1:
            p = y.expand_as(z)
        else:
            # Knot i - 1 <= z < knot i (right=True), so the two knots of a segment differ wherever z lies between them.
            right = torch.searchsorted(x, z.contiguous(), right=True).clamp(1, x.numel() - 1)
            x0, x1, y0, y1 = x[right - 1], x[right], y[right - 1], y[right]
            step = ((z - x0) / (x1 - x0)).nan_to_num(0.0).clamp(0.0, 1.0)
            p = y0 + step * (y1 - y0)
        return torch.logit(p.clamp(_PROBABILITY_FLOOR, 1 - _PROBABILITY_FLOOR)).to(value.dtype)

    def to_dict(self) -> dict[str, list[float]]:
        return {"logits": self.logits.tolist(), "probabilities": self.probabilities.tolist()}


# Platt scaling as (scale, shift), or an isotonic map.
OutputCalibration = Union[tuple[float, float], IsotonicCalibration]


def apply_output_calibration(outputs: Mapping[str, torch.Tensor],
                             calibration: Mapping[str, OutputCalibration]) -> dict[str, torch.Tensor]:
    """``outputs`` with each task in ``calibration`` mapped: ``logit -> scale * logit + shift`` (Platt
    scaling) or through an :class:`IsotonicCalibration`; other tasks unchanged."""
    mapped = {}
    for name, value in outputs.items():
        fitted = calibration.get(name)
        if fitted is None:
            mapped[name] = value
        elif isinstance(fitted, IsotonicCalibration):
            mapped[name] = fitted(value)
        else:
            mapped[name] = value * fitted[0] + fitted[1]
    return mapped
