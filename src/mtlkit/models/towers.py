"""Per-task towers and output heads, all tasks batched together."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from mtlkit.models.layers import StackedMLP
from mtlkit.tasks import TaskOutputs, TaskSpec

__all__ = ["TaskTowers"]


class TaskTowers(nn.Module):
    """One tower (MLP) plus output head per task, computed as one stacked MLP.

    The head width of each task comes from its task type (``TaskSpec.output_dim``); heads are padded
    to the widest one so all towers stay one batched op, and each task reads its own slice.

    Args:
        tasks: task specs, in output order.
        input_dim: width of each tower's input.
        hidden_sizes: tower hidden layers (may be empty: a linear head only).
        shared_input: whether all towers read one ``(B, in)`` input (Shared-Bottom, OMoE) or each its
            own ``(B, K, in)`` slice (MMoE, PLE, single-task).

    Shape: ``(B, in)`` or ``(B, K, in)`` ``-> {task: (B, output_dim)}`` (raw logits / values), as a
    :class:`~mtlkit.tasks.TaskOutputs` that also holds the stacked ``(K, B, width)`` output.
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        input_dim: int,
        hidden_sizes: Sequence[int],
        shared_input: bool,
        activation: str = "relu",
        dropout: float = 0.0,
        norm: str | None = None,
    ) -> None:
        super().__init__()
        self.task_names = [t.name for t in tasks]
        self.output_dims = [t.output_dim for t in tasks]
        self.net = StackedMLP(
            len(tasks),
            input_dim,
            tuple(hidden_sizes) + (max(self.output_dims),),
            shared_input=shared_input,
            activation=activation,
            dropout=dropout,
            norm=norm,
            activate_last=False,
        )

    def forward(self, x: torch.Tensor) -> TaskOutputs:
        return TaskOutputs(self.net.forward_stack_major(x), self.task_names, self.output_dims)
