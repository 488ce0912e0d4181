"""AITM: adaptive information transfer along a conversion funnel (Xi et al., KDD 2021)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtlkit.configuration import check_sizes
from mtlkit.errors import ConfigError
from mtlkit.models.base import ModelConfig, MultiTaskModel
from mtlkit.models.layers import StackedLinear, StackedMLP
from mtlkit.models.registry import register_model
from mtlkit.models.towers import TaskTowers

__all__ = ["AITMConfig", "AdaptiveInformationTransferModel", "funnel_violation"]


def funnel_violation(earlier: torch.Tensor, later: torch.Tensor) -> torch.Tensor:
    """``max(p_later - p_earlier, 0)`` per row, from two binary tasks' logits: how far a later step
    of a funnel (a purchase) is predicted as likelier than the step it needs (the click).

    Shape: ``(B, 1), (B, 1) -> (B, 1)``.
    """
    return F.relu(torch.sigmoid(later) - torch.sigmoid(earlier))


@dataclass
class AITMConfig(ModelConfig):
    """Config of :class:`AdaptiveInformationTransferModel`.

    Args:
        tasks: the funnel's steps in order (impression -> click -> purchase -> ...): each step's
            event can only happen after the one before it.
        bottom_hidden: hidden widths of each task's own network ``q_t`` (the public PyTorch port
            adtalos/AITM-torch: 128, 64, 32); its last width is the width of the information passed between tasks.
        tower_hidden: hidden widths between a task's transferred representation and its head
            (default none: a linear head, as in that port).
        calibration_weight: weight ``alpha`` of the behavioural expectation calibrator, the penalty
            ``alpha * mean_rows sum_t max(p_t - p_{t-1}, 0)`` over each pair of consecutive binary
            tasks, added to the training objective (0.6 in that port; 0 turns it off).
    """

    bottom_hidden: Sequence[int] = (128, 64, 32)
    tower_hidden: Sequence[int] = ()
    calibration_weight: float = 0.6

    def __post_init__(self) -> None:
        super().__post_init__()
        self.bottom_hidden = check_sizes(self.bottom_hidden, "bottom_hidden", allow_empty=False)
        w = self.calibration_weight
        if not (isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 and math.isfinite(w)):
            raise ConfigError(f"calibration_weight: expected a finite number >= 0, got {w!r}")
        self.calibration_weight = float(w)


@register_model("aitm")
class AdaptiveInformationTransferModel(MultiTaskModel):
    """Each task has its own network ``q_t``; task ``t`` also receives ``p_{t-1} = g(z_{t-1})``, what
    the task before it learned, and an attention over the two decides how much of each to use:
    ``z_t = sum_u w_u h3(u)``, ``w = softmax_u(<h1(u), h2(u)> / sqrt(d))`` over ``u in {p_{t-1}, q_t}``,
    ``z_1 = q_1``. Each ``z_t`` feeds the task's tower and head.

    Information only flows down the funnel: task ``t``'s output depends on the networks of tasks
    ``1..t`` and never on later ones. The calibrator (:meth:`auxiliary_loss`) penalises predicting a
    later step likelier than the one it needs.

    The task networks run as one stacked MLP and the towers as one; only the transfer chain, where
    each task waits for the one before, is a loop over the ``K - 1`` links (a few small matmuls each).

    Shape: ``(B, input_dim) -> {task: (B, output_dim)}``.
    """

    config_class = AITMConfig

    def __init__(self, config: AITMConfig) -> None:
        super().__init__(config)
        c = config
        self.bottoms = StackedMLP(c.num_tasks, c.input_dim, c.bottom_hidden, shared_input=True,
                                  activation=c.activation, dropout=c.dropout, norm=c.norm)
        width = self.bottoms.output_dim
        links = c.num_tasks - 1
        # g_{t-1}: one ReLU layer per link, as in the paper; h1, h2, h3 of each link as one [d, 3d] map.
        self.transfer = StackedLinear(links, width, width, shared_input=False) if links else None
        self.attention = nn.Parameter(torch.empty(links, width, 3 * width)) if links else None
        self.dropout = nn.Dropout(c.dropout) if c.dropout > 0 else nn.Identity()
        self.towers = TaskTowers(c.tasks, width, c.tower_hidden, shared_input=False,
                                 activation=c.activation, dropout=c.dropout, norm=c.norm)
        # Calibrated pairs: consecutive tasks that are both binary (only probabilities compare).
        self.calibrated_pairs = [(a.name, b.name) for a, b in zip(c.tasks, c.tasks[1:])
                                 if a.type == "binary" and b.type == "binary"]
        self.reset_attention()

    def reset_attention(self) -> None:
        """Initialise the attention maps like ``nn.Linear`` without bias."""
        if self.attention is not None:
            bound = 1.0 / math.sqrt(self.attention.shape[1])
            nn.init.uniform_(self.attention, -bound, bound)

    def transferred(self, x: torch.Tensor) -> torch.Tensor:
        """The representations ``z_t`` the towers read. Shape: ``(B, input_dim) -> (K, B, d)``."""
        q = self.bottoms.forward_stack_major(x)
        width = q.shape[-1]
        z = [q[0]]
        for link in range(q.shape[0] - 1):  # each link waits for the previous task's z
            p = self.dropout(F.relu(torch.addmm(self.transfer.bias[link], z[-1], self.transfer.weight[link])))
            u = torch.stack((p, q[link + 1]))  # (2, B, d)
            h1, h2, h3 = torch.matmul(u, self.attention[link]).split(width, dim=-1)
            w = torch.softmax((h1 * h2).sum(-1, keepdim=True) / math.sqrt(width), dim=0)  # (2, B, 1)
            z.append((w * h3).sum(0))
        return torch.stack(z)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.towers(self.transferred(x).transpose(0, 1))

    def auxiliary_loss(self, outputs: Mapping[str, torch.Tensor], labels: torch.Tensor | None = None,
                       label_mask: torch.Tensor | None = None, sample_weight: torch.Tensor | None = None) -> torch.Tensor | None:
        """The behavioural expectation calibrator: ``calibration_weight`` times the mean over rows of
        the summed :func:`funnel_violation` of each pair of consecutive binary tasks (None when the
        weight is 0 or no pair is binary)."""
        if self.config.calibration_weight == 0 or not self.calibrated_pairs:
            return None
        total = sum(funnel_violation(outputs[a], outputs[b]).mean() for a, b in self.calibrated_pairs)
        return self.config.calibration_weight * total
