"""ESMM: the entire-space multi-task model (Ma et al., SIGIR 2018), and its chain over a funnel of K steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from mtlkit.errors import ConfigError
from mtlkit.models.base import ModelConfig, MultiTaskModel
from mtlkit.models.registry import register_model
from mtlkit.models.towers import TaskTowers
from mtlkit.tasks import TaskSpec

__all__ = ["ESMMConfig", "EntireSpaceMultiTaskModel", "esmm_tasks", "probability_product_logit",
           "FunnelESMMConfig", "EntireSpaceFunnelModel"]


def esmm_tasks(ctr: str = "ctr", cvr: str = "cvr", ctcvr: str = "ctcvr",
               ctr_label: str | None = None, cvr_label: str | None = None, ctcvr_label: str | None = None) -> list[TaskSpec]:
    """The three ESMM tasks. The CVR task has weight 0: it is evaluated (on clicked rows) but never
    trained on directly, which is the point of ESMM."""
    return [TaskSpec(ctr, "binary", ctr_label, 1.0), TaskSpec(cvr, "binary", cvr_label, 0.0),
            TaskSpec(ctcvr, "binary", ctcvr_label, 1.0)]


def probability_product_logit(logit_a: torch.Tensor, logit_b: torch.Tensor) -> torch.Tensor:
    """``logit(sigmoid(a) * sigmoid(b))``, computed in log space.

    Returning a logit keeps "models output logits" true for pCTCVR, so the ordinary
    BCE-with-logits loss on it equals BCE on the product pCTR x pCVR, without ``log(0)``.
    """
    log_p = (F.logsigmoid(logit_a) + F.logsigmoid(logit_b)).clamp(max=-1e-7)
    # log(1 - p) = log(-expm1(log p)); log1p(-exp) is the accurate branch for small p.
    log_not_p = torch.where(log_p > -0.6931, torch.log(-torch.expm1(log_p)), torch.log1p(-torch.exp(log_p)))
    return log_p - log_not_p


@dataclass
class ESMMConfig(ModelConfig):
    """Config of :class:`EntireSpaceMultiTaskModel`.

    Args:
        tasks: exactly the CTR, CVR and CTCVR tasks (see :func:`esmm_tasks`).
        tower_hidden: hidden widths of the CTR and of the CVR network (paper: 360, 200, 80).
        ctr_task, cvr_task, ctcvr_task: which task name plays which role.
    """

    tower_hidden: Sequence[int] = (360, 200, 80)
    ctr_task: str = "ctr"
    cvr_task: str = "cvr"
    ctcvr_task: str = "ctcvr"

    def __post_init__(self) -> None:
        super().__post_init__()
        roles = [self.ctr_task, self.cvr_task, self.ctcvr_task]
        names = [t.name for t in self.tasks]
        if sorted(names) != sorted(roles) or len(set(roles)) != 3:
            raise ConfigError(f"esmm: tasks must be exactly {roles} (ctr_task, cvr_task, ctcvr_task), got {names}")
        wrong = [t.name for t in self.tasks if t.type != "binary"]
        if wrong:
            raise ConfigError(f"esmm: every task must be binary, not {wrong}")


@register_model("esmm")
class EntireSpaceMultiTaskModel(MultiTaskModel):
    """CTR and CVR networks on the shared input; ``pCTCVR = pCTR x pCVR``.

    Trained on CTR and CTCVR over all impressions (give the CVR task weight 0, as :func:`esmm_tasks`
    does), so the CVR network learns on the entire space without sample-selection bias.

    Shape: ``(B, input_dim) -> {ctr: (B, 1), cvr: (B, 1), ctcvr: (B, 1)}`` (logits).
    """

    config_class = ESMMConfig
    any_number_of_tasks = False

    def __init__(self, config: ESMMConfig) -> None:
        super().__init__(config)
        c = config
        by_name = {t.name: t for t in c.tasks}
        self.towers = TaskTowers([by_name[c.ctr_task], by_name[c.cvr_task]], c.input_dim, c.tower_hidden,
                                 shared_input=True, activation=c.activation, dropout=c.dropout, norm=c.norm)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.config
        out = self.towers(x)
        ctr, cvr = out[c.ctr_task], out[c.cvr_task]
        return {c.ctr_task: ctr, c.cvr_task: cvr, c.ctcvr_task: probability_product_logit(ctr, cvr)}


@dataclass
class FunnelESMMConfig(ModelConfig):
    """Config of :class:`EntireSpaceFunnelModel`.

    Args:
        tasks: the funnel's steps in order (click, cart, purchase, ...), all binary; each task's label
            is the step's event over all impressions (a purchase counts only with its click).
        tower_hidden: hidden widths of each step's conditional network (ESMM's 360, 200, 80).
    """

    tower_hidden: Sequence[int] = (360, 200, 80)

    def __post_init__(self) -> None:
        super().__post_init__()
        wrong = [t.name for t in self.tasks if t.type != "binary"]
        if wrong:
            raise ConfigError(f"esmm_funnel: every step must be a binary task, not {wrong}")


@register_model("esmm_funnel")
class EntireSpaceFunnelModel(MultiTaskModel):
    """ESMM's product over a funnel of any length: step ``t`` has a network for ``P(e_t | e_{t-1}, x)``
    and outputs the entire-space ``P(e_t | x) = prod_{j <= t} P(e_j | e_{j-1}, x)``, trained on all
    impressions with the step's own label. With two steps it is ESMM's CTR and CTCVR; the conditional
    rates (ESMM's CVR) come from :meth:`conditional_logits`. A later step is never predicted likelier
    than the one before, by construction.

    All steps' networks run as one stacked MLP. Shape: ``(B, input_dim) -> {step: (B, 1)}`` (logits).
    """

    config_class = FunnelESMMConfig
    task_types = ("binary",)

    def __init__(self, config: FunnelESMMConfig) -> None:
        super().__init__(config)
        c = config
        self.towers = TaskTowers(c.tasks, c.input_dim, c.tower_hidden, shared_input=True,
                                 activation=c.activation, dropout=c.dropout, norm=c.norm)

    def conditional_logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each step's logit given the step before (the first: given the impression). ``(B, 1)`` each."""
        return dict(self.towers(x))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out, previous = {}, None
        for name, logit in self.towers(x).items():  # each step multiplies the one before: a chain
            previous = logit if previous is None else probability_product_logit(previous, logit)
            out[name] = previous
        return out
