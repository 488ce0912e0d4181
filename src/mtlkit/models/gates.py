"""Softmax gates over experts, all gates of a level in one (batched) matmul."""

from __future__ import annotations

import torch
from torch import nn

from mtlkit.errors import ConfigError
from mtlkit.models.layers import StackedLinear

__all__ = ["GateBank", "mix_experts"]


class GateBank(nn.Module):
    """``num_gates`` gates ``softmax((W_g x + b_g) / temperature)``, each over ``num_choices`` experts.

    With ``shared_input=True`` all gates read one ``(B, in)`` selector and are a single matmul; otherwise
    gate ``g`` reads ``x[:, g]`` of a ``(B, G, in)`` input (one batched matmul).

    The weights of the last forward are kept in ``last_weights`` only while ``record`` is True, so
    analysis costs nothing when it is off.

    Shape: ``(B, in)`` or ``(B, G, in)`` ``-> (B, G, num_choices)``; each row sums to 1.
    """

    def __init__(self, num_gates: int, input_dim: int, num_choices: int, shared_input: bool = True, temperature: float = 1.0) -> None:
        super().__init__()
        if num_choices < 1:
            raise ConfigError(f"a gate needs at least one expert to choose from, got {num_choices}")
        if not temperature > 0:
            raise ConfigError(f"gate_temperature must be > 0, got {temperature}")
        self.linear = StackedLinear(num_gates, input_dim, num_choices, shared_input=shared_input)
        self.temperature = float(temperature)
        self.record = False
        self.last_weights: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.linear(x)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        weights = torch.softmax(logits, dim=-1)
        if self.record:
            self.last_weights = weights.detach()
        return weights


def mix_experts(gate_weights: torch.Tensor, expert_outputs: torch.Tensor) -> torch.Tensor:
    """Gate-weighted sum of expert outputs.

    Shape: gates ``(B, G, E)``, experts ``(B, E, D)`` ``-> (B, G, D)``.
    """
    return torch.bmm(gate_weights, expert_outputs)
