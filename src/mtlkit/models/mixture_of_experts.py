"""One-gate (OMoE) and multi-gate (MMoE, Ma et al., KDD 2018) mixtures of experts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from mtlkit.configuration import check_count, check_sizes
from mtlkit.models.base import ModelConfig, MultiTaskModel
from mtlkit.models.experts import ExpertBank
from mtlkit.models.gate_settings import GateSettings
from mtlkit.models.gates import mix_experts
from mtlkit.models.registry import register_model
from mtlkit.models.small_mixture import small_mixture_applies, small_mixture_outputs
from mtlkit.models.towers import TaskTowers

__all__ = ["MixtureOfExpertsConfig", "OneGateMixtureOfExperts", "MultiGateMixtureOfExperts"]


@dataclass
class MixtureOfExpertsConfig(GateSettings, ModelConfig):
    """Config of OMoE and MMoE; the gate fields (``gate_type``, ``gate_top_k``, ...) are
    :class:`~mtlkit.models.gate_settings.GateSettings`'.

    Args:
        num_experts: number of experts (>= 1); the MMoE paper's synthetic set-up uses 8.
        expert_hidden: layer widths of each expert (paper: ``(16,)``).
    """

    num_experts: int = 8
    expert_hidden: Sequence[int] = (16,)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count(self.num_experts, "num_experts", 1)
        self.expert_hidden = check_sizes(self.expert_hidden, "expert_hidden", allow_empty=False)
        self.check_gate_settings(self.num_experts, "num_experts")


class _MixtureOfExperts(MultiTaskModel):
    config_class = MixtureOfExpertsConfig
    num_gates_per_model: int | None = None  # None: one gate per task
    # Small ReLU mixtures on the CPU run as one batch-last autograd node (models/small_mixture.py);
    # False keeps the module-by-module path (e.g. to hook the experts' or towers' submodules).
    small_mixture: bool = True

    def __init__(self, config: MixtureOfExpertsConfig) -> None:
        super().__init__(config)
        c = config
        self.experts = ExpertBank(c.num_experts, c.input_dim, c.expert_hidden,
                                  activation=c.activation, dropout=c.dropout, norm=c.norm)
        self.one_gate = self.num_gates_per_model == 1
        num_gates = 1 if self.one_gate else c.num_tasks
        self.gates = c.build_gate_bank(num_gates, c.input_dim, c.num_experts, shared_input=True,
                                       gate_names=["all tasks"] if self.one_gate else [t.name for t in c.tasks])
        self.towers = TaskTowers(c.tasks, self.experts.output_dim, c.tower_hidden, shared_input=self.one_gate,
                                 activation=c.activation, dropout=c.dropout, norm=c.norm)

    def shared_layer_parameters(self) -> list[torch.nn.Parameter]:
        """The experts' last layer (every gate mixes every expert)."""
        return list(self.experts.linears[-1].parameters())

    def takes_small_mixture_path(self, x: torch.Tensor, levels: list | None = None) -> bool:
        """Whether ``forward(x)`` runs as one batch-last node (:mod:`mtlkit.models.small_mixture`)."""
        return self.small_mixture and small_mixture_applies(x, levels or [(self.experts, self.gates)], self.towers)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        experts, gates, towers = self.experts, self.gates, self.towers
        levels = [(experts, gates)]
        if self.takes_small_mixture_path(x, levels):
            return small_mixture_outputs(x, levels, towers)
        mixed = mix_experts(gates(x), experts(x))  # [B, G, D]
        return towers(mixed[:, 0] if self.one_gate else mixed)


@register_model("omoe")
class OneGateMixtureOfExperts(_MixtureOfExperts):
    """OMoE: experts combined by one gate shared by all tasks, then a tower per task.

    Shape: ``(B, input_dim) -> {task: (B, output_dim)}``.
    """

    num_gates_per_model = 1


@register_model("mmoe")
class MultiGateMixtureOfExperts(_MixtureOfExperts):
    """MMoE: shared experts, one softmax gate per task, then a tower per task.

    Shape: ``(B, input_dim) -> {task: (B, output_dim)}``.
    """

    num_gates_per_model = None
