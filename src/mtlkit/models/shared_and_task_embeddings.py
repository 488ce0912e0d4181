"""STEM (shared and task-specific embeddings, Su et al., AAAI 2024): every task has its own copy of
the input embeddings and its own experts on them, beside shared ones; each task's gate reads every
expert but trains only its own and the shared ones."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtlkit.errors import ConfigError
from mtlkit.models.gates import mix_experts
from mtlkit.models.progressive_layered_extraction import CGCConfig, PLEConfig, ProgressiveLayeredExtraction, _ExtractionLevel
from mtlkit.models.registry import register_model

__all__ = ["STEMConfig", "SharedAndTaskSpecificEmbeddings"]


@dataclass
class STEMConfig(PLEConfig):
    """Config of STEM: :class:`~mtlkit.models.PLEConfig`'s fields (``num_levels`` levels of
    ``num_task_experts`` experts per task and ``num_shared_experts`` shared ones), plus:

    Args:
        stop_gradient: the paper's "all forward, task-specific backward" gating: task ``k``'s gate mixes
            the other tasks' experts into its output, but its loss does not train them (nor, through
            them, the other tasks' embeddings). False lets every task train every expert it mixes
            (an ablation; the paper's point is that the task-specific embeddings then lose their
            isolation).
    """

    stop_gradient: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_task_experts < 1:
            raise ConfigError(f"num_task_experts: STEM feeds each task's own embeddings to its own experts, so it "
                              f"needs at least 1 per task, got {self.num_task_experts}")
        if self.num_shared_experts < 1:
            raise ConfigError(f"num_shared_experts: STEM feeds the shared embeddings to shared experts, so it needs "
                              f"at least 1, got {self.num_shared_experts}")
        if not isinstance(self.stop_gradient, bool):
            raise ConfigError(f"stop_gradient: expected true or false, got {self.stop_gradient!r}")


class _STEMLevel(_ExtractionLevel):
    """One STEM level on ``K + 1`` inputs (task ``k``'s view, then the shared one): task ``k``'s
    ``Et`` experts read view ``k``, the ``Es`` shared experts the shared view. Task ``k``'s gate reads
    its view plus the shared one and mixes all ``K * Et + Es`` experts; below the last level a shared
    gate reads the shared view and mixes all of them too.

    With ``stop_gradient``, the entries a gate takes from another task's experts pass no gradient
    into those experts (the gate's own weights still learn from them).

    Shape: ``(B, K + 1, in) -> (B, K + 1, D)``, or ``(B, K, D)`` at the last level.
    """

    gates_see_all_experts = True

    def __init__(self, c: CGCConfig, input_dim: int, first: bool, last: bool) -> None:
        # Every level reads K + 1 separate views, as PLE's levels above the first do.
        super().__init__(c, input_dim, first=False, last=last)
        K, Et = c.num_tasks, c.num_task_experts
        self.stop_gradient = c.stop_gradient
        own = torch.zeros(self.num_gates, K * Et + c.num_shared_experts)
        for k in range(K):
            own[k, k * Et:(k + 1) * Et] = 1
        own[:K, K * Et:] = 1
        own[K:] = 1  # the shared gate trains every expert it mixes
        # 1 where a gate's weight passes gradient into the expert, 0 where it reads the expert as if detached.
        self.register_buffer("trained_by_gate", own, persistent=False)

    def gate_selector(self, h: torch.Tensor) -> torch.Tensor:
        """Task ``k``'s gate reads view ``k`` plus the shared view; the shared gate the shared view."""
        K = self.num_tasks
        shared = h[:, K:K + 1]
        selector = h[:, :K] + shared
        return torch.cat([selector, shared], dim=1) if self.has_shared_gate else selector

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        experts = self.experts(h)
        weights = self.gates(self.gate_selector(h))
        # One mix; only its backward differs: each gate's gradient reaches its own and the shared experts.
        return mix_experts(weights, experts, self.trained_by_gate if self.stop_gradient else None)


@register_model("stem")
class SharedAndTaskSpecificEmbeddings(ProgressiveLayeredExtraction):
    """STEM: ``num_levels`` levels of task-specific and shared experts over ``K + 1`` input views,
    then a tower per task.

    On a table (:class:`~mtlkit.models.TabularMultiTaskModel`), the feature encoder keeps ``K + 1``
    copies of every embedding (:attr:`input_views`): task ``k``'s experts read copy ``k``, the shared
    experts the last, so a task whose signal conflicts with another's keeps embeddings of its own.
    Dense features are the same in every view. Given a plain ``(B, input_dim)`` input, every view is
    that input (the model is then PLE with all-expert gates and the gradient stops).

    Shape: ``(B, input_dim)`` or ``(B, K + 1, input_dim) -> {task: (B, output_dim)}``.
    """

    config_class = STEMConfig
    level_class = _STEMLevel
    # Views per input row and gradient stops: the one-node CPU path has neither.
    small_mixture = False

    @classmethod
    def input_views(cls, config: STEMConfig) -> int:
        return config.num_tasks + 1

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        views = self.input_views(self.config)
        if x.dim() == 2:
            h = x.unsqueeze(1).expand(-1, views, -1)
        elif x.dim() == 3 and x.shape[1] == views:
            h = x
        else:
            raise ValueError(f"stem: expected input (B, {self.config.input_dim}) or (B, {views}, "
                             f"{self.config.input_dim}) (one view per task, then the shared one), got {tuple(x.shape)}")
        for level in self.levels:
            h = level(h)
        return self.towers(h)
