"""Banks of experts, evaluated as batched tensor operations."""

from __future__ import annotations

from typing import Sequence

import torch

from mtlkit.models.layers import StackedMLP

__all__ = ["ExpertBank"]


class ExpertBank(StackedMLP):
    """``num_experts`` experts of identical MLP shape, computed together.

    With a shared input ``x`` of shape ``(B, in)`` the first layer of all experts is one matmul;
    deeper layers are one batched matmul each. With ``input_groups`` (PLE levels above the first),
    expert ``e`` reads ``x[:, input_groups[e]]`` from an input of shape ``(B, G, in)``.

    Args:
        num_experts: number of experts ``E`` (>= 1).
        input_dim: input width.
        hidden_sizes: layer widths of each expert; the output width ``D`` is the last one. Every
            layer, the last included, is followed by the activation (the MMoE paper's experts are
            ``ReLU(Linear(x))``).
        input_groups: optional group index per expert (length ``E``). ``group_sizes`` then holds,
            where the experts of each group are consecutive, how many read each group (else None).
        activation, dropout, norm: as in :class:`~mtlkit.models.layers.MLP`.

    Shape: ``(B, in)`` or ``(B, G, in)`` ``-> (B, E, D)``.

    Example::

        >>> bank = ExpertBank(8, 100, (16,))
        >>> bank(torch.zeros(32, 100)).shape
        torch.Size([32, 8, 16])
    """

    def __init__(
        self,
        num_experts: int,
        input_dim: int,
        hidden_sizes: Sequence[int],
        input_groups: Sequence[int] | None = None,
        activation: str = "relu",
        dropout: float = 0.0,
        norm: str | None = None,
    ) -> None:
        super().__init__(
            num_experts,
            input_dim,
            hidden_sizes,
            shared_input=input_groups is None,
            activation=activation,
            dropout=dropout,
            norm=norm,
            activate_last=True,
        )
        if input_groups is not None:
            if len(input_groups) != num_experts:
                raise ValueError(f"input_groups needs one entry per expert ({num_experts}), got {len(input_groups)}")
            self.register_buffer("input_groups", torch.as_tensor(list(input_groups), dtype=torch.long), persistent=False)
            # Experts of one group in consecutive runs (PLE's order: each task's, then the shared
            # ones) read their group's input through one GEMM on the fused path, without a gather.
            runs = list(input_groups) == sorted(input_groups)
            self.group_sizes = tuple(list(input_groups).count(g) for g in range(max(input_groups) + 1)) if runs else None
        else:
            self.input_groups = None
            self.group_sizes = None

    @property
    def num_experts(self) -> int:
        return self.num_stacks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_groups is not None:
            if self.group_sizes is not None and self.takes_fused_path(x):
                sizes = self.group_sizes + (0,) * (x.shape[1] - len(self.group_sizes))
                return self.fused_forward(x, sizes)
            x = x.index_select(1, self.input_groups)
        return super().forward(x)
