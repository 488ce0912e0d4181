"""AdaTT (adaptive task-to-task fusion, Li et al., KDD 2023): PLE's levels with every gate fusing
all of a level's experts, plus a learned residual from each task's own experts."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mtlkit.errors import ConfigError
from mtlkit.models.gates import mix_experts
from mtlkit.models.progressive_layered_extraction import CGCConfig, PLEConfig, ProgressiveLayeredExtraction, _ExtractionLevel
from mtlkit.models.registry import register_model

__all__ = ["AdaTTConfig", "AdaptiveTaskFusion"]


@dataclass
class AdaTTConfig(PLEConfig):
    """Config of AdaTT: :class:`~mtlkit.models.PLEConfig`'s fields (``num_levels`` fusion levels of
    ``num_task_experts`` experts per task and ``num_shared_experts`` shared ones; 0 shared experts is
    the paper's AdaTT-sp), plus:

    Args:
        native_residual: add to each task's gated fusion a learned linear combination of its own
            experts (the paper's "native experts" residual; the authors call it crucial), and to the
            shared gate's fusion one of the shared experts. Where each task owns one expert and there
            is at most one shared expert, each module's own expert is added unweighted, as in the
            authors' code. False leaves the gates alone (an ablation).
    """

    native_residual: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_task_experts < 1:
            raise ConfigError(f"num_task_experts: AdaTT fuses each task's own experts with the others, so it needs "
                              f"at least 1 per task, got {self.num_task_experts}")
        if not isinstance(self.native_residual, bool):
            raise ConfigError(f"native_residual: expected true or false, got {self.native_residual!r}")


class _FusionLevel(_ExtractionLevel):
    """One AdaTT level: ``K * Et`` task experts then ``Es`` shared ones; every gate (one per task, and a
    shared one below the last level where there are shared experts) is a softmax over all of them,
    and module ``m``'s native experts (task ``k``'s own; the shared gate's: the shared experts) add
    ``v_m`` to their entries of its gate's weights, so the fusion is ``sum_e (g_me + v_me) E_e``.

    Shape: as :class:`_ExtractionLevel`'s, ``(B, in)`` or ``(B, G, in) -> (B, G', D)``.
    """

    gates_see_all_experts = True

    def __init__(self, c: CGCConfig, input_dim: int, first: bool, last: bool) -> None:
        super().__init__(c, input_dim, first, last)
        K, Et, Es = c.num_tasks, c.num_task_experts, c.num_shared_experts
        self.native_residual = c.native_residual
        self.register_buffer("unit_native", None, persistent=False)
        self.task_native: torch.nn.Parameter | None = None
        self.shared_native: torch.nn.Parameter | None = None
        if not self.native_residual:
            return
        # Where each residual weight goes in the flat (G, E) offsets: task k's row at its own experts'
        # columns, then the shared gate's row at the shared columns (one scatter builds the offsets).
        E = K * Et + Es
        positions = [k * E + k * Et + j for k in range(K) for j in range(Et)]
        if self.has_shared_gate:
            positions += [K * E + K * Et + j for j in range(Es)]
        self.register_buffer("native_positions", torch.tensor(positions), persistent=False)
        if Et == 1 and Es <= 1:
            # Each module's single native expert added with weight 1, as in the authors' code.
            self.unit_native = self._dense(torch.ones(K, 1), torch.ones(Es) if self.has_shared_gate else None)
            return
        bound = 1 / math.sqrt(Et)
        self.task_native = torch.nn.Parameter(torch.empty(K, Et).uniform_(-bound, bound))
        if self.has_shared_gate:
            bound = 1 / math.sqrt(Es)
            self.shared_native = torch.nn.Parameter(torch.empty(Es).uniform_(-bound, bound))

    def _dense(self, task_native: torch.Tensor, shared_native: torch.Tensor | None) -> torch.Tensor:
        """The residual as ``(G, E)`` gate-weight offsets: task ``k``'s row holds its weights at its own
        experts' columns, the shared gate's row the shared weights at the shared columns, zeros elsewhere
        (without a shared gate the shared experts' columns are no gate's natives)."""
        values = task_native.reshape(-1) if shared_native is None else torch.cat([task_native.reshape(-1), shared_native])
        G, E = self.num_gates, self.experts.num_experts
        return values.new_zeros(G * E).index_put((self.native_positions,), values).view(G, E)

    def gate_residual(self) -> torch.Tensor | None:
        """What the level adds to its gates' weights: ``(G, E)``, or None without the residual."""
        if not self.native_residual:
            return None
        return self.unit_native if self.unit_native is not None else self._dense(self.task_native, self.shared_native)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``residual``: :meth:`gate_residual`'s value where the caller has it already (None: built here)."""
        experts = self.experts(h)
        weights = self.gates(self.gate_selector(h))
        if residual is None:
            residual = self.gate_residual()
        return mix_experts(weights if residual is None else weights + residual, experts)


@register_model("adatt")
class AdaptiveTaskFusion(ProgressiveLayeredExtraction):
    """AdaTT: ``num_levels`` fusion levels, then a tower per task. Each task's fusion unit mixes every
    expert of the level, its own, the other tasks' and the shared ones, through its gate, and adds a
    learned combination of its own experts (:class:`AdaTTConfig`), so a task can draw on any other
    task's experts as much as the data says, while its own experts stay a direct path.

    On the CPU small levels run as one node (:mod:`mtlkit.models.small_mixture`), as PLE's do, the
    residual added to the gates' weights inside it.

    Shape: ``(B, input_dim) -> {task: (B, output_dim)}``.
    """

    config_class = AdaTTConfig
    level_class = _FusionLevel

    def _mixture_levels(self) -> list:
        return [(level._modules["experts"], level._modules["gates"], level.gate_residual()) for level in self._modules["levels"]]
