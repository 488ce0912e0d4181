"""Single-Task baseline: one independent network per task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from mtlkit.configuration import check_sizes
from mtlkit.models.base import ModelConfig, MultiTaskModel
from mtlkit.models.layers import StackedMLP
from mtlkit.models.registry import register_model
from mtlkit.models.towers import TaskTowers

__all__ = ["SingleTaskConfig", "SingleTaskModel"]


@dataclass
class SingleTaskConfig(ModelConfig):
    """Config of :class:`SingleTaskModel`.

    Args:
        bottom_hidden: hidden widths of each task's own bottom network (before its tower).
    """

    bottom_hidden: Sequence[int] = (16,)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.bottom_hidden = check_sizes(self.bottom_hidden, "bottom_hidden", allow_empty=False)


@register_model("single_task")
class SingleTaskModel(MultiTaskModel):
    """K networks that share nothing, trained jointly only for convenience (one step updates all).

    Each task has ``bottom_hidden`` then ``tower_hidden`` then its head; all K networks run as one
    stacked MLP. Shape: ``(B, input_dim) -> {task: (B, output_dim)}``.
    """

    config_class = SingleTaskConfig

    def __init__(self, config: SingleTaskConfig) -> None:
        super().__init__(config)
        c = config
        self.bottoms = StackedMLP(c.num_tasks, c.input_dim, c.bottom_hidden, shared_input=True,
                                  activation=c.activation, dropout=c.dropout, norm=c.norm)
        self.towers = TaskTowers(c.tasks, self.bottoms.output_dim, c.tower_hidden, shared_input=False,
                                 activation=c.activation, dropout=c.dropout, norm=c.norm)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.towers(self.bottoms(x))
