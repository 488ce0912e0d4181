"""ESCM2-IPS (Wang et al., SIGIR 2022, "entire space counterfactual multi-task model"): ESMM plus a
counterfactual risk that trains the CVR network for the entire space of impressions, not only the
clicked ones, by weighting each clicked row's CVR loss with the inverse of its predicted CTR."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F

from mtlkit.errors import ConfigError
from mtlkit.models.esmm import ESMMConfig, EntireSpaceMultiTaskModel
from mtlkit.models.registry import register_model

__all__ = ["ESCM2Config", "EntireSpaceCounterfactualModel", "inverse_propensity_risk"]


def inverse_propensity_risk(cvr_logit: torch.Tensor, conversion: torch.Tensor, click: torch.Tensor,
                            propensity: torch.Tensor, row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse-propensity estimate of the CVR network's log loss over all impressions:
    ``sum_i w_i o_i BCE(cvr_i, y_i) / p_i / sum_i w_i``, with ``o_i`` the click, ``y_i`` the
    conversion and ``p_i`` the propensity (the predicted CTR). Unclicked rows add nothing to the
    numerator but count in the denominator, so with ``E[o / p] = 1`` it estimates the mean loss as
    if every impression had been clicked.

    Shapes: every argument ``(B,)``; returns a scalar. ``row_weight`` (None: 1 each) is 0 on rows
    that must not count at all (a missing label).
    """
    # Unclicked rows have o = 0 but any label, possibly none: their loss term is computed on 0.
    per_row = F.binary_cross_entropy_with_logits(cvr_logit, torch.where(click > 0, conversion, 0.0), reduction="none")
    weighted = click * per_row / propensity
    if row_weight is None:
        return weighted.mean()
    return (row_weight * weighted).sum() / row_weight.sum().clamp_min(1e-12)


@dataclass
class ESCM2Config(ESMMConfig):
    """Config of :class:`EntireSpaceCounterfactualModel`: :class:`~mtlkit.models.ESMMConfig`'s
    fields, plus:

    Args:
        counterfactual_weight: ``lambda_c``, the weight of the counterfactual CVR risk added to the
            CTR and CTCVR losses (0 is ESMM). The CTCVR loss's weight (the paper's ``lambda_g``) is
            the CTCVR task's ``weight``.
        propensity_floor: the smallest predicted CTR a clicked row's weight divides by, in (0, 1]:
            a row with a tiny predicted CTR would otherwise dominate the batch (weights at most
            ``1 / propensity_floor``).
    """

    counterfactual_weight: float = 0.1
    propensity_floor: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        weight = self.counterfactual_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"counterfactual_weight: expected a finite number >= 0, got {weight!r}")
        floor = self.propensity_floor
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 < floor <= 1:
            raise ConfigError(f"propensity_floor: expected a number in (0, 1], got {floor!r}")


@register_model("escm2")
class EntireSpaceCounterfactualModel(EntireSpaceMultiTaskModel):
    """ESCM2-IPS: ESMM's CTR and CVR networks and ``pCTCVR = pCTR x pCVR``, trained on CTR and CTCVR
    over all impressions plus ``counterfactual_weight`` times the inverse-propensity CVR risk
    (:func:`inverse_propensity_risk`; the model's :meth:`auxiliary_loss`).

    The propensity is the model's own predicted CTR, detached and floored at ``propensity_floor``:
    the counterfactual risk trains the CVR network only, never the CTR network that weights it.
    Conversions are read from the CTCVR label on clicked rows (a conversion over all impressions is
    a conversion after the click), so the CVR task may stay unlabelled outside clicks.

    Shape: ``(B, input_dim) -> {ctr: (B, 1), cvr: (B, 1), ctcvr: (B, 1)}`` (logits), as ESMM.
    """

    config_class = ESCM2Config

    def __init__(self, config: ESCM2Config) -> None:
        super().__init__(config)
        names = self.task_names
        self._ctr_column, self._ctcvr_column = names.index(config.ctr_task), names.index(config.ctcvr_task)

    def auxiliary_loss(self, outputs: Mapping[str, torch.Tensor], labels: torch.Tensor | None = None,
                       label_mask: torch.Tensor | None = None, sample_weight: torch.Tensor | None = None) -> torch.Tensor | None:
        """``counterfactual_weight`` times :func:`inverse_propensity_risk` of the batch (None when
        the weight is 0), over the rows where both the click and the CTCVR label are present.
        ``labels`` and ``label_mask`` are ``(B, K)`` in task order; ``sample_weight`` ``(B,)``."""
        c = self.config
        if c.counterfactual_weight == 0:
            return None
        if labels is None or label_mask is None:
            raise ValueError("escm2: the counterfactual risk needs the batch's labels and label mask")
        present = label_mask[:, self._ctr_column] & label_mask[:, self._ctcvr_column]
        click = torch.where(present, labels[:, self._ctr_column], 0.0)
        conversion = torch.where(present, labels[:, self._ctcvr_column], 0.0)
        propensity = torch.sigmoid(outputs[c.ctr_task].detach().squeeze(-1)).clamp_min(c.propensity_floor)
        # A weight of 0 on rows without both labels; no test of whether any is missing (a host sync).
        row_weight = present.float() if sample_weight is None else present * sample_weight
        risk = inverse_propensity_risk(outputs[c.cvr_task].squeeze(-1), conversion, click, propensity, row_weight)
        return c.counterfactual_weight * risk
