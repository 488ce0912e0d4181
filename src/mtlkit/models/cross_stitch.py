"""Soft parameter sharing: Cross-Stitch networks (Misra et al., CVPR 2016), for K tasks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from mtlkit.configuration import check_sizes
from mtlkit.errors import ConfigError
from mtlkit.models.base import ModelConfig, MultiTaskModel
from mtlkit.models.layers import StackedMLP
from mtlkit.models.registry import register_model
from mtlkit.models.towers import TaskTowers

__all__ = ["CrossStitchConfig", "CrossStitchNetwork"]


@dataclass
class CrossStitchConfig(ModelConfig):
    """Config of :class:`CrossStitchNetwork`.

    Args:
        bottom_hidden: layer widths of each task's own network; a cross-stitch unit follows every layer.
        self_weight: initial weight of a task's own activations in its unit (the rest is shared equally
            among the other tasks), as the paper's (0.9, 0.1) initialisation.
    """

    bottom_hidden: Sequence[int] = (64, 32)
    self_weight: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        self.bottom_hidden = check_sizes(self.bottom_hidden, "bottom_hidden", allow_empty=False)
        if not (isinstance(self.self_weight, (int, float)) and 0 <= self.self_weight <= 1):
            raise ConfigError(f"self_weight: expected a number in [0, 1], got {self.self_weight!r}")


@register_model("cross_stitch")
class CrossStitchNetwork(MultiTaskModel):
    """One network per task; after every layer a learned ``K x K`` unit linearly mixes the tasks'
    activations (``h_k <- sum_j alpha[k, j] h_j``), so sharing is learned rather than fixed.

    All task networks run as one stacked MLP layer by layer. Shape: ``(B, input_dim) -> {task: (B, output_dim)}``.
    """

    config_class = CrossStitchConfig

    def __init__(self, config: CrossStitchConfig) -> None:
        super().__init__(config)
        c = config
        k = c.num_tasks
        self.layers = nn.ModuleList()
        width = c.input_dim
        for i, size in enumerate(c.bottom_hidden):
            self.layers.append(StackedMLP(k, width, (size,), shared_input=i == 0, activation=c.activation,
                                          dropout=c.dropout, norm=c.norm))
            width = size
        other = (1.0 - c.self_weight) / (k - 1) if k > 1 else 0.0
        initial = torch.full((k, k), other) + torch.eye(k) * (c.self_weight - other)
        self.stitches = nn.Parameter(initial.repeat(len(c.bottom_hidden), 1, 1))  # [layers, K, K]
        self.towers = TaskTowers(c.tasks, width, c.tower_hidden, shared_input=False,
                                 activation=c.activation, dropout=c.dropout, norm=c.norm)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = x
        for layer, stitch in zip(self.layers, self.stitches):
            h = torch.einsum("kj,bjh->bkh", stitch, layer(h))
        return self.towers(h)
