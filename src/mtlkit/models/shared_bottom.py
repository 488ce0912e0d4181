"""Shared-Bottom (hard parameter sharing)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from mtlkit.configuration import check_sizes
from mtlkit.models.base import ModelConfig, MultiTaskModel
from mtlkit.models.layers import StackedMLP
from mtlkit.models.registry import register_model
from mtlkit.models.towers import TaskTowers

__all__ = ["SharedBottomConfig", "SharedBottomModel"]


@dataclass
class SharedBottomConfig(ModelConfig):
    """Config of :class:`SharedBottomModel`.

    Args:
        bottom_hidden: widths of the shared bottom (the MMoE paper's synthetic baseline: ``(113,)``).
    """

    bottom_hidden: Sequence[int] = (113,)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.bottom_hidden = check_sizes(self.bottom_hidden, "bottom_hidden", allow_empty=False)


@register_model("shared_bottom")
class SharedBottomModel(MultiTaskModel):
    """All tasks read one shared bottom network; each has its own tower.

    Shape: ``(B, input_dim) -> {task: (B, output_dim)}``.
    """

    config_class = SharedBottomConfig

    def __init__(self, config: SharedBottomConfig) -> None:
        super().__init__(config)
        c = config
        # A one-stack StackedMLP keeps the parameter layout identical to a one-expert bank.
        self.bottom = StackedMLP(1, c.input_dim, c.bottom_hidden, shared_input=True,
                                 activation=c.activation, dropout=c.dropout, norm=c.norm)
        self.towers = TaskTowers(c.tasks, self.bottom.output_dim, c.tower_hidden, shared_input=True,
                                 activation=c.activation, dropout=c.dropout, norm=c.norm)

    def shared_layer_parameters(self) -> list[torch.nn.Parameter]:
        """The bottom's last layer."""
        return list(self.bottom.linears[-1].parameters())

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.towers(self.bottom(x)[:, 0])
