"""CGC and PLE (Progressive Layered Extraction, Tang et al., RecSys 2020)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from mtlkit.errors import ConfigError
from mtlkit.configuration import check_count, check_sizes
from mtlkit.models.base import ModelConfig, MultiTaskModel
from mtlkit.models.experts import ExpertBank
from mtlkit.models.gate_settings import GateSettings
from mtlkit.models.gates import mix_experts
from mtlkit.models.registry import register_model
from mtlkit.models.small_mixture import small_mixture_applies, small_mixture_outputs
from mtlkit.models.towers import TaskTowers

__all__ = ["CGCConfig", "PLEConfig", "CustomizedGateControl", "ProgressiveLayeredExtraction"]


@dataclass
class CGCConfig(GateSettings, ModelConfig):
    """Config of CGC (one extraction level); the gate fields are
    :class:`~mtlkit.models.gate_settings.GateSettings`', and ``gate_top_k`` counts among the experts
    a gate may choose.

    Args:
        num_shared_experts: experts every task may select (>= 0).
        num_task_experts: experts owned by each task (>= 0); at least one expert per task in all.
        expert_hidden: layer widths of each expert.
    """

    num_shared_experts: int = 4
    num_task_experts: int = 2
    expert_hidden: Sequence[int] = (16,)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count(self.num_shared_experts, "num_shared_experts", 0)
        check_count(self.num_task_experts, "num_task_experts", 0)
        if self.num_shared_experts + self.num_task_experts < 1:
            raise ConfigError("num_shared_experts + num_task_experts must be >= 1 (each task needs an expert), got 0")
        self.expert_hidden = check_sizes(self.expert_hidden, "expert_hidden", allow_empty=False)
        self.check_gate_settings(self.num_tasks * self.num_task_experts + self.num_shared_experts,
                                 "the experts of a level (num_tasks * num_task_experts + num_shared_experts)")

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
    """One PLE level: ``K * Et`` task experts then ``Es`` shared experts, and all its gates as one bank.

    Task ``k``'s gate chooses among its own ``Et`` experts and the ``Es`` shared ones; unless the level
    is the last, a shared gate chooses among all of them. Each gate's weights are dense over the
    level's experts (exact zeros outside its choices), so all gates are one matmul and one softmax
    and the mixing one batched product.

    Input ``(B, in)`` (first level) or ``(B, K + 1, in)`` (task inputs then the shared input);
    output ``(B, K, D)`` (last level) or ``(B, K + 1, D)``.
    """

    # AdaTT's levels (models/adaptive_task_fusion.py) let every gate mix all of the level's experts.
    gates_see_all_experts = False

    def __init__(self, c: CGCConfig, input_dim: int, first: bool, last: bool) -> None:
        super().__init__()
        K, Et, Es = c.num_tasks, c.num_task_experts, c.num_shared_experts
        total = K * Et + Es
        self.first, self.num_tasks = first, K
        groups = None if first else [k for k in range(K) for _ in range(Et)] + [K] * Es
        self.experts = ExpertBank(total, input_dim, c.expert_hidden, input_groups=groups,
                                  activation=c.activation, dropout=c.dropout, norm=c.norm)
        shared = list(range(K * Et, total))
        everything = list(range(total))
        # A shared gate feeds the next level's shared experts; PLE keeps it even without any.
        self.has_shared_gate = not last and (Es > 0 or not self.gates_see_all_experts)
        if self.gates_see_all_experts:
            task_choices = [everything] * K
        else:
            task_choices = [list(range(k * Et, (k + 1) * Et)) + shared for k in range(K)]
        self.choices = task_choices + ([everything] if self.has_shared_gate else [])
        self.num_gates = len(self.choices)
        tasks = [t.name for t in c.tasks]
        self.gates = c.build_gate_bank(self.num_gates, input_dim, total, shared_input=first,
                                       choices=None if self.gates_see_all_experts else self.choices,
                                       gate_names=tasks + (["shared"] if self.has_shared_gate else []),
                                       choice_names=[f"{task} {i}" for task in tasks for i in range(Et)]
                                       + [f"shared {i}" for i in range(Es)])
        self.output_dim = self.experts.output_dim

    def gate_selector(self, h: torch.Tensor) -> torch.Tensor:
        """What the gates read: the input itself at the first level; above it gate ``g`` reads input
        ``g`` (task ``k``'s, then the shared one where the level below had a shared gate)."""
        return h if self.first or h.shape[1] == self.num_gates else h[:, : self.num_gates]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        experts = self.experts(h)
        return mix_experts(self.gates(self.gate_selector(h)), experts)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._upgrade_two_gate_banks(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _upgrade_two_gate_banks(self, state_dict, prefix: str) -> None:
        """Rewrite, in place, a state dict written before a level's gates became one bank: then a
        ``task_gates`` bank held each task's gate over its own choices and ``shared_gate`` the shared one."""
        task_weight, task_bias = prefix + "task_gates.linear.weight", prefix + "task_gates.linear.bias"
        if task_weight not in state_dict:
            return
        old_weight, old_bias = state_dict.pop(task_weight), state_dict.pop(task_bias)
        shared_weight = state_dict.pop(prefix + "shared_gate.linear.weight", None)
        shared_bias = state_dict.pop(prefix + "shared_gate.linear.bias", None)
        linear = self.gates.linear
        G, E, width = self.num_gates, linear.out_features, linear.in_features
        weight = old_weight.new_zeros(G, width, E)  # gate-major; excluded choices stay 0
        bias = old_bias.new_zeros(G, E)
        compact = old_weight.view(width, self.num_tasks, -1).transpose(0, 1) if self.first else old_weight
        for k in range(self.num_tasks):
            weight[k][:, self.choices[k]] = compact[k]
            bias[k, self.choices[k]] = old_bias[k]
        if shared_weight is not None:
            weight[self.num_tasks] = shared_weight
            bias[self.num_tasks] = shared_bias[0]
        state_dict[prefix + "gates.linear.weight"] = weight.transpose(0, 1).reshape(width, G * E) if self.first else weight
        state_dict[prefix + "gates.linear.bias"] = bias


@register_model("ple")
class ProgressiveLayeredExtraction(MultiTaskModel):
    """PLE: ``num_levels`` extraction levels of task-specific and shared experts, then a tower per task.

    In a non-final level a shared gate over all experts produces the next level's shared input, and
    each task's fused output is that task's next input (experts and gate selector alike).

    Shape: ``(B, input_dim) -> {task: (B, output_dim)}``.
    """

    config_class = PLEConfig
    # Levels of small ReLU experts on the CPU run as one batch-last autograd node
    # (models/small_mixture.py); False keeps the module-by-module path.
    small_mixture: bool = True

    level_class: type[_ExtractionLevel] = _ExtractionLevel

    def __init__(self, config: CGCConfig) -> None:
        super().__init__(config)
        c = config
        self.levels = torch.nn.ModuleList()
        width = c.input_dim
        for level in range(c.levels):
            block = self.level_class(c, width, first=level == 0, last=level == c.levels - 1)
            self.levels.append(block)
            width = block.output_dim
        self.towers = TaskTowers(c.tasks, width, c.tower_hidden, shared_input=False,
                                 activation=c.activation, dropout=c.dropout, norm=c.norm)

    def shared_layer_parameters(self) -> list[torch.nn.Parameter]:
        """The last level's experts' last layer: one stacked tensor of the shared experts, which every
        task's gate mixes, and the task experts, each of which only its own task reaches."""
        return list(self.levels[-1].experts.linears[-1].parameters())

    def takes_small_mixture_path(self, x: torch.Tensor, levels: list | None = None) -> bool:
        """Whether ``forward(x)`` runs as one batch-last node (:mod:`mtlkit.models.small_mixture`)."""
        return self.small_mixture and small_mixture_applies(x, levels or self._mixture_levels(), self.towers)

    def _mixture_levels(self) -> list:
        # The modules' own dictionaries: getattr costs about 0.5 us a submodule (small_mixture._member).
        return [(level._modules["experts"], level._modules["gates"]) for level in self._modules["levels"]]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        levels = self._mixture_levels()
        if self.takes_small_mixture_path(x, levels):
            return small_mixture_outputs(x, levels, self.towers)
        h = x
        for level, (_, _, *residual) in zip(self.levels, levels):
            h = level(h, *residual)  # AdaTT's levels take the residual _mixture_levels built
        return self.towers(h)


@register_model("cgc")
class CustomizedGateControl(ProgressiveLayeredExtraction):
    """CGC: a single PLE extraction level (task experts + shared experts, one gate per task).

    Its parameters are named as in ``PLE(num_levels=1)``, so state dicts move between the two.
    """

    config_class = CGCConfig
