"""ESCM2 (Wang et al., SIGIR 2022, "entire space counterfactual multi-task model"): ESMM plus a
counterfactual risk that trains the CVR network for the entire space of impressions, not only the
clicked ones: ESCM2-IPS weights each clicked row's CVR loss with the inverse of its predicted CTR;
ESCM2-DR (doubly robust) adds an imputation network whose predicted conversions stand in for the
unclicked rows' missing labels, corrected on the clicked rows by the same inverse weights."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F

from mtlkit.errors import ConfigError
from mtlkit.models.esmm import ESMMConfig, EntireSpaceMultiTaskModel
from mtlkit.models.registry import register_model
from mtlkit.models.towers import TaskTowers
from mtlkit.tasks import TaskSpec

__all__ = ["ESCM2Config", "EntireSpaceCounterfactualModel", "doubly_robust_risk", "inverse_propensity_risk"]


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


def doubly_robust_risk(cvr_logit: torch.Tensor, conversion: torch.Tensor, click: torch.Tensor, propensity: torch.Tensor,
                       imputation_logit: torch.Tensor, row_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The doubly robust estimate of the CVR network's log loss over all impressions, and the loss
    that fits the imputation to it (the joint learning of Wang et al., ICML 2019, as ESCM2-DR uses it).

    With ``e_i = BCE(cvr_i, y_i)`` the loss on the conversion ``y_i`` (known where clicked) and
    ``e^_i = BCE(cvr_i, r_i)`` the loss on the imputed conversion ``r_i = sigmoid(imputation_logit_i)``
    (known everywhere), the risk is ``sum_i w_i [e^_i + o_i (e_i - e^_i) / p_i] / sum_i w_i``. It is
    unbiased where either the propensities or the imputed errors are right, and its variance
    shrinks as ``e^`` nears ``e``: an unclicked row trains the CVR network towards its imputed
    conversion, a clicked one corrects that towards its label. The imputation is held fixed in the
    risk, and the CVR network in the imputation's loss,
    ``sum_i w_i o_i (e_i - e^_i)^2 / p_i / sum_i w_i``, which trains ``r`` so that ``e^`` predicts
    the clicked rows' errors, weighted as the risk weights them.

    Shapes: every argument ``(B,)``; returns two scalars ``(risk, imputation loss)``. ``row_weight``
    (None: 1 each) is 0 on rows that must not count at all (a missing label).
    """
    observed = torch.where(click > 0, conversion, 0.0)  # unclicked rows: any label, possibly none; o = 0 drops it
    error = F.binary_cross_entropy_with_logits(cvr_logit, observed, reduction="none")
    imputed = torch.sigmoid(imputation_logit)
    # BCE(z, r) = softplus(z) - r z, written out so that each network's gradient is routed explicitly.
    imputed_error = F.softplus(cvr_logit) - imputed.detach() * cvr_logit
    fitted_error = F.softplus(cvr_logit.detach()) - imputed * cvr_logit.detach()
    inverse = click / propensity
    risk = imputed_error + inverse * (error - imputed_error)
    imputation = inverse * (error.detach() - fitted_error).square()
    if row_weight is None:
        return risk.mean(), imputation.mean()
    total = row_weight.sum().clamp_min(1e-12)
    return (row_weight * risk).sum() / total, (row_weight * imputation).sum() / total


COUNTERFACTUAL_MODES = ("ips", "dr")


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
        counterfactual_mode: ``"ips"`` (ESCM2-IPS, :func:`inverse_propensity_risk`) or ``"dr"``
            (ESCM2-DR, :func:`doubly_robust_risk`, with an imputation network shaped like the CVR
            network: ``tower_hidden`` then one logit).
        imputation_weight: with ``"dr"``, the weight of the imputation's loss beside the risk (both
            then scaled by ``counterfactual_weight``; with ``"dr"`` neither may be 0).
    """

    counterfactual_weight: float = 0.1
    propensity_floor: float = 0.05
    counterfactual_mode: str = "ips"
    imputation_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        weight = self.counterfactual_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"counterfactual_weight: expected a finite number >= 0, got {weight!r}")
        floor = self.propensity_floor
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 < floor <= 1:
            raise ConfigError(f"propensity_floor: expected a number in (0, 1], got {floor!r}")
        if self.counterfactual_mode not in COUNTERFACTUAL_MODES:
            raise ConfigError(f"counterfactual_mode: expected one of {list(COUNTERFACTUAL_MODES)}, got {self.counterfactual_mode!r}")
        weight = self.imputation_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"imputation_weight: expected a finite number >= 0, got {weight!r}")
        if self.counterfactual_mode == "dr":
            # Nothing would train the imputation network (and DDP refuses parameters without gradients).
            for key in ("counterfactual_weight", "imputation_weight"):
                if getattr(self, key) == 0:
                    raise ConfigError(f"{key}: expected a number > 0 with counterfactual_mode dr, whose imputation network "
                                      "it trains; got 0 (use counterfactual_mode ips, or esmm)")


@register_model("escm2")
class EntireSpaceCounterfactualModel(EntireSpaceMultiTaskModel):
    """ESCM2: ESMM's CTR and CVR networks and ``pCTCVR = pCTR x pCVR``, trained on CTR and CTCVR
    over all impressions plus ``counterfactual_weight`` times a counterfactual CVR risk (the model's
    :meth:`auxiliary_loss`): the inverse-propensity one (:func:`inverse_propensity_risk`, ESCM2-IPS)
    or, with ``counterfactual_mode: dr``, the doubly robust one plus the imputation's loss
    (:func:`doubly_robust_risk`, ESCM2-DR). The imputation network reads the same input as the CVR
    network and runs only in training forwards: predictions are ESMM's.

    The propensity is the model's own predicted CTR, detached and floored at ``propensity_floor``:
    the counterfactual risk trains the CVR network only, never the CTR network that weights it.
    Conversions are read from the CTCVR label on clicked rows (a conversion over all impressions is
    a conversion after the click), so the CVR task may stay unlabelled outside clicks.

    Shape: ``(B, input_dim) -> {ctr: (B, 1), cvr: (B, 1), ctcvr: (B, 1)}`` (logits), as ESMM.
    """

    config_class = ESCM2Config

    def __init__(self, config: ESCM2Config) -> None:
        super().__init__(config)
        c, names = config, self.task_names
        self._ctr_column, self._ctcvr_column = names.index(c.ctr_task), names.index(c.ctcvr_task)
        self.imputation = None if c.counterfactual_mode != "dr" else TaskTowers(
            [TaskSpec("imputation", "binary")], c.input_dim, c.tower_hidden, shared_input=True,
            activation=c.activation, dropout=c.dropout, norm=c.norm)
        self._pending_imputation: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(x)
        if self.imputation is not None and self.training and torch.is_grad_enabled():
            # Kept for this forward's auxiliary_loss; predictions and evaluations never run it.
            self._pending_imputation = self.imputation(x)["imputation"].squeeze(-1)
        return out

    def auxiliary_loss(self, outputs: Mapping[str, torch.Tensor], labels: torch.Tensor | None = None,
                       label_mask: torch.Tensor | None = None, sample_weight: torch.Tensor | None = None) -> torch.Tensor | None:
        """``counterfactual_weight`` times the batch's counterfactual risk (None when the weight is
        0): :func:`inverse_propensity_risk`, or with ``dr`` :func:`doubly_robust_risk`'s risk plus
        ``imputation_weight`` times its imputation loss (from the imputation of the training forward
        that made ``outputs``; None without gradients and without one), over the rows where both the
        click and the CTCVR label are present.
        ``labels`` and ``label_mask`` are ``(B, K)`` in task order; ``sample_weight`` ``(B,)``."""
        c = self.config
        imputation_logit, self._pending_imputation = self._pending_imputation, None
        if c.counterfactual_weight == 0:
            return None
        if labels is None or label_mask is None:
            raise ValueError("escm2: the counterfactual risk needs the batch's labels and label mask")
        if self.imputation is not None and imputation_logit is None and not torch.is_grad_enabled():
            return None  # a look at the losses without training (FAMO's after its step): no imputation ran
        present = label_mask[:, self._ctr_column] & label_mask[:, self._ctcvr_column]
        click = torch.where(present, labels[:, self._ctr_column], 0.0)
        conversion = torch.where(present, labels[:, self._ctcvr_column], 0.0)
        propensity = torch.sigmoid(outputs[c.ctr_task].detach().squeeze(-1)).clamp_min(c.propensity_floor)
        # A weight of 0 on rows without both labels; no test of whether any is missing (a host sync).
        row_weight = present.float() if sample_weight is None else present * sample_weight
        cvr_logit = outputs[c.cvr_task].squeeze(-1)
        if self.imputation is None:
            return c.counterfactual_weight * inverse_propensity_risk(cvr_logit, conversion, click, propensity, row_weight)
        if imputation_logit is None or imputation_logit.shape != cvr_logit.shape:
            raise ValueError("escm2 with counterfactual_mode dr: the auxiliary loss needs the imputation of a training "
                             "forward (train mode, gradients on) on the same batch")
        risk, imputation = doubly_robust_risk(cvr_logit, conversion, click, propensity, imputation_logit, row_weight)
        return c.counterfactual_weight * (risk + c.imputation_weight * imputation)
