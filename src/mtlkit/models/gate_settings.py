"""The gate options every mixture-of-experts config shares (OMoE, MMoE, CGC, PLE), and the gate
bank they build: softmax gates or DSelect-k gates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from mtlkit.configuration import check_non_negative, check_positive, check_probability
from mtlkit.errors import ConfigError
from mtlkit.models.dselect_gates import DSelectKGateBank
from mtlkit.models.gates import GateBank, check_top_k

__all__ = ["GATE_TYPES", "GATE_CONDITIONINGS", "GateSettings"]

GATE_TYPES = ("softmax", "dselect_k")
GATE_CONDITIONINGS = ("example", "task")


@dataclass(kw_only=True)
class GateSettings:
    """Gate fields of a mixture config (a base class of the config dataclass).

    Args:
        gate_type: ``"softmax"`` (the papers' gate) or ``"dselect_k"`` (Hazimeh et al., NeurIPS 2021:
            ``gate_top_k`` differentiable single-expert selectors, see
            :class:`~mtlkit.models.DSelectKGateBank`).
        gate_conditioning: ``"example"``: a gate's weights depend on the row (the papers' gates, read
            from the input); ``"task"``: on the task only, the same weights for every row (the
            static gates of Hazimeh et al.; with DSelect-k each task converges to exactly
            ``gate_top_k`` experts).
        gate_temperature: softmax temperature of the gates (> 0; 1 is the paper's gate).
        gate_dropout: in training, the probability that a gate ignores an expert for a row (its
            weight set to 0, the rest renormalised; Zhao et al., RecSys 2019, against gates that
            collapse onto one expert); 0 turns it off.
        gate_top_k: softmax gates: each gate mixes only its ``k`` highest-scoring experts for a row (a
            sparse mixture, Shazeer et al., ICLR 2017), null mixes them all. DSelect-k gates: the
            number of selectors, so at most ``k`` experts per gate and row once they converge
            (required).
        gate_smooth_step_width: DSelect-k's ``gamma``, the width of the smooth step's cubic region.
        gate_entropy_weight: DSelect-k: weight of the selectors' entropy in the objective (0: none;
            more makes the selectors converge to single experts sooner).
    """

    gate_type: str = "softmax"
    gate_conditioning: str = "example"
    gate_temperature: float = 1.0
    gate_dropout: float = 0.0
    gate_top_k: int | None = None
    gate_smooth_step_width: float = 1.0
    gate_entropy_weight: float = 0.0

    def check_gate_settings(self, num_experts: int, experts: str) -> None:
        """Validate the gate fields; ``gate_top_k`` is at most ``num_experts`` (``experts`` names it)."""
        if self.gate_type not in GATE_TYPES:
            raise ConfigError(f"gate_type: unknown {self.gate_type!r}; expected one of {list(GATE_TYPES)}")
        if self.gate_conditioning not in GATE_CONDITIONINGS:
            raise ConfigError(f"gate_conditioning: unknown {self.gate_conditioning!r}; expected one of {list(GATE_CONDITIONINGS)}")
        check_positive(self.gate_temperature, "gate_temperature")
        check_probability(self.gate_dropout, "gate_dropout")
        check_top_k(self.gate_top_k, num_experts, experts)
        check_positive(self.gate_smooth_step_width, "gate_smooth_step_width")
        check_non_negative(self.gate_entropy_weight, "gate_entropy_weight")
        if self.gate_type == "dselect_k":
            if self.gate_top_k is None:
                raise ConfigError("gate_top_k: gate_type dselect_k needs the number of experts each gate selects "
                                  f"(an integer from 1 to {experts} ({num_experts})), got null")
            for key, default in (("gate_temperature", 1.0), ("gate_dropout", 0.0)):
                if getattr(self, key) != default:
                    raise ConfigError(f"{key}: applies to softmax gates only; gate_type dselect_k expects {default}, "
                                      f"got {getattr(self, key)!r}")
        else:
            for key, default in (("gate_smooth_step_width", 1.0), ("gate_entropy_weight", 0.0)):
                if getattr(self, key) != default:
                    raise ConfigError(f"{key}: applies to gate_type dselect_k only; softmax gates expect {default}, "
                                      f"got {getattr(self, key)!r}")

    def build_gate_bank(self, num_gates: int, input_dim: int, num_choices: int, *, shared_input: bool,
                        choices: Sequence[Sequence[int]] | None = None, gate_names: Sequence[str] | None = None,
                        choice_names: Sequence[str] | None = None) -> GateBank:
        """The gates of one mixture level, of this config's type (arguments as :class:`GateBank`'s;
        task-conditioned gates read none of the ``input_dim`` features)."""
        if self.gate_conditioning == "task":
            input_dim = 0
        if self.gate_type == "dselect_k":
            return DSelectKGateBank(num_gates, input_dim, num_choices, self.gate_top_k, shared_input=shared_input,
                                    choices=choices, gate_names=gate_names, choice_names=choice_names,
                                    smooth_step_width=self.gate_smooth_step_width, entropy_weight=self.gate_entropy_weight)
        return GateBank(num_gates, input_dim, num_choices, shared_input=shared_input, temperature=self.gate_temperature,
                        dropout=self.gate_dropout, top_k=self.gate_top_k, choices=choices, gate_names=gate_names,
                        choice_names=choice_names)
