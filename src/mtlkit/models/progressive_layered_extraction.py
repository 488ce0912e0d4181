"""CGC and PLE (Progressive Layered Extraction, Tang et al., RecSys 2020)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from mtlkit.errors import ConfigError
from mtlkit.configuration import check_count, check_positive, check_sizes
from mtlkit.models.base import ModelConfig, MultiTaskModel
from mtlkit.models.experts import ExpertBank
from mtlkit.models.gates import GateBank, mix_experts
from mtlkit.models.registry import register_model
from mtlkit.models.towers import TaskTowers

__all__ = ["CGCConfig", "PLEConfig", "CustomizedGateControl", "ProgressiveLayeredExtraction"]


@dataclass
class CGCConfig(ModelConfig):
    """Config of CGC (one extraction level).

    Args:
        num_shared_experts: experts every task may select (>= 0).
        num_task_experts: experts owned by each task (>= 0); at least one expert per task in all.
        expert_hidden: layer widths of each expert.
        gate_temperature: softmax temperature of the gates (> 0).
    """

    num_shared_experts: int = 4
    num_task_experts: int = 2
    expert_hidden: Sequence[int] = (16,)
    gate_temperature: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count(self.num_shared_experts, "num_shared_experts", 0)
        check_count(self.num_task_experts, "num_task_experts", 0)
        if self.num_shared_experts + self.num_task_experts < 1:
            raise ConfigError("num_shared_experts + num_task_experts must be >= 1 (each task needs an expert), got 0")
        self.expert_hidden = check_sizes(self.expert_hidden, "expert_hidden", allow_empty=False)
        check_positive(self.gate_temperature, "gate_temperature")

    @property
    def levels(self) -> int:
        return 1


@dataclass
class PLEConfig(CGCConfig):
    """Config of PLE: CGC plus ``num_levels`` >= 1 stacked extraction levels (1 is exactly CGC)."""

    num_levels: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count(self.num_levels, "num_levels", 1)

    @property
    def levels(self) -> int:
        return self.num_levels


class _ExtractionLevel(torch.nn.Module):
    """One PLE level: ``K * Et`` task experts then ``Es`` shared experts, task gates and (unless last) a shared gate.

    Input ``(B, in)`` (first level) or ``(B, K + 1, in)`` (task inputs then the shared input);
    output ``(B, K, D)`` (last level) or ``(B, K + 1, D)``.
    """

    def __init__(self, c: CGCConfig, input_dim: int, first: bool, last: bool) -> None:
        super().__init__()
        K, Et, Es = c.num_tasks, c.num_task_experts, c.num_shared_experts
        total = K * Et + Es
        self.first, self.num_tasks = first, K
        groups = None if first else [k for k in range(K) for _ in range(Et)] + [K] * Es
        self.experts = ExpertBank(total, input_dim, c.expert_hidden, input_groups=groups,
                                  activation=c.activation, dropout=c.dropout, norm=c.norm)
        self.task_gates = GateBank(K, input_dim, Et + Es, shared_input=first, temperature=c.gate_temperature)
        self.shared_gate = None if last else GateBank(1, input_dim, total, shared_input=True, temperature=c.gate_temperature)
        # selection[k, j, e] = 1 when choice j of task k's gate is expert e: turns each task's compact
        # gate (own + shared experts) into a dense one over all experts, so mixing is one bmm.
        selection = torch.zeros(K, Et + Es, total)
        for k in range(K):
            chosen = list(range(k * Et, (k + 1) * Et)) + list(range(K * Et, total))
            selection[k, torch.arange(Et + Es), chosen] = 1.0
        self.register_buffer("selection", selection, persistent=False)
        self.output_dim = self.experts.output_dim

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        experts = self.experts(h)
        task_selector = h if self.first else h[:, : self.num_tasks]
        gates = torch.einsum("bkc,kce->bke", self.task_gates(task_selector), self.selection)
        if self.shared_gate is not None:
            shared_selector = h if self.first else h[:, self.num_tasks]
            gates = torch.cat([gates, self.shared_gate(shared_selector)], dim=1)
        return mix_experts(gates, experts)


@register_model("ple")
class ProgressiveLayeredExtraction(MultiTaskModel):
    """PLE: ``num_levels`` extraction levels of task-specific and shared experts, then a tower per task.

    In a non-final level a shared gate over all experts produces the next level's shared input, and
    each task's fused output is that task's next input (experts and gate selector alike).

    Shape: ``(B, input_dim) -> {task: (B, output_dim)}``.
    """

    config_class = PLEConfig

    def __init__(self, config: CGCConfig) -> None:
        super().__init__(config)
        c = config
        self.levels = torch.nn.ModuleList()
        width = c.input_dim
        for level in range(c.levels):
            block = _ExtractionLevel(c, width, first=level == 0, last=level == c.levels - 1)
            self.levels.append(block)
            width = block.output_dim
        self.towers = TaskTowers(c.tasks, width, c.tower_hidden, shared_input=False,
                                 activation=c.activation, dropout=c.dropout, norm=c.norm)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = x
        for level in self.levels:
            h = level(h)
        return self.towers(h)


@register_model("cgc")
class CustomizedGateControl(ProgressiveLayeredExtraction):
    """CGC: a single PLE extraction level (task experts + shared experts, one gate per task).

    Its parameters are named as in ``PLE(num_levels=1)``, so state dicts move between the two.
    """

    config_class = CGCConfig
