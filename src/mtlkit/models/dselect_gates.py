"""DSelect-k gates (Hazimeh et al., NeurIPS 2021): sparse and differentiable expert selection.

A softmax gate mixes every expert; a top-k gate is sparse but not differentiable where its choice
changes, so its training jumps. DSelect-k selects through ``k`` single-expert selectors. Selector
``i`` reads ``m = ceil(log2 n)`` logits ``z_i``, passes each through a smooth step ``S`` that is
exactly 0 or 1 outside ``[-gamma/2, gamma/2]`` and a cubic inside, and puts on expert ``l`` (binary
digits ``l_j``) the weight ``prod_j S(z_ij)^{l_j} (1 - S(z_ij))^{1 - l_j}``: a distribution over
the ``2^m`` codes that is one-hot once every digit has left the cubic region, and there its
gradient is zero, so a converged selector stays converged. The gate is the mixture of its
selectors under a softmax over ``k`` more logits; it has at most ``k`` non-zero weights once the
selectors have converged.

Every gate of a bank has its selectors' logits in one matmul (all gates, ``k (m + 1)`` outputs
each), and the codes are built for all rows, gates and selectors at once, one binary digit at a
time (``m`` <= 4 steps for up to 16 experts).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from mtlkit.configuration import check_count, check_non_negative, check_positive
from mtlkit.models.gates import GateBank

__all__ = ["DSelectKGateBank", "smooth_step"]

# The floor under the entropy's logarithm, so that an exactly-zero code weight has a finite gradient
# (and under the penalty's reciprocal, so that a selector stuck on codes of no expert stays finite).
_EPSILON = 1e-6


def smooth_step(logits: torch.Tensor, width: float) -> torch.Tensor:
    """The cubic smooth step: 0 below ``-width/2``, 1 above ``width/2``, ``3t/(2w) - 2t^3/w^3 + 1/2``
    between, continuously differentiable. Written on ``u = clamp(t/w, -1/2, 1/2)`` so that the ends
    are exactly 0 and 1 in floating point and their gradient is exactly 0. Shape: any, elementwise."""
    u = (logits / width).clamp(-0.5, 0.5)
    return 0.5 + u * (1.5 - 2.0 * u * u)


class DSelectKGateBank(GateBank):
    """``num_gates`` DSelect-k gates of ``k`` selectors each over ``num_choices`` experts, conditioned
    on the example (each row chooses its own experts), or with ``input_dim=0`` on the task only (the
    paper's static gates: every row the same experts).

    With ``choices``, gate ``g`` chooses among ``choices[g]`` only (PLE): its selectors use as many
    binary digits as that many experts need, the others are held at 0, and code ``l`` stands for
    expert ``choices[g][l]``. Where a gate's expert count is not a power of two some codes stand for
    no expert; the paper's penalty ``1 / (weight on real experts) - 1`` keeps the selectors off them.

    In training (with gradients on) the forward leaves its regularisation terms in
    :meth:`take_penalty`, which the model's ``auxiliary_loss`` collects: that penalty, plus
    ``entropy_weight`` times the selectors' entropy (which pushes them to converge sooner), each a
    mean over rows summed over gates and selectors.

    Logits start within ``+-width/100`` of 0 (the paper's initialisation), so every selector starts
    near uniform with its digits in the smooth step's cubic region.

    Shape: ``(B, in)`` or ``(B, G, in)`` ``-> (B, G, num_choices)``; each row sums to 1 (up to the
    weight left on codes of no expert, which the penalty drives to 0).
    """

    def __init__(self, num_gates: int, input_dim: int, num_choices: int, k: int, shared_input: bool = True,
                 choices: Sequence[Sequence[int]] | None = None, gate_names: Sequence[str] | None = None,
                 choice_names: Sequence[str] | None = None, smooth_step_width: float = 1.0,
                 entropy_weight: float = 0.0) -> None:
        check_count(k, "gate_top_k (a DSelect-k gate's number of selectors)", 1)
        check_positive(smooth_step_width, "gate_smooth_step_width")
        check_non_negative(entropy_weight, "gate_entropy_weight")
        num_digits = _digits(num_choices)
        super().__init__(num_gates, input_dim, num_choices, shared_input=shared_input, choices=choices,
                         gate_names=gate_names, choice_names=choice_names, logits_per_gate=k * (num_digits + 1))
        self.num_digits = num_digits
        # top_k marks the gate as sparse for code that asks (the fused CPU path has no such gate).
        self.top_k = k
        self.smooth_step_width = float(smooth_step_width)
        self.entropy_weight = float(entropy_weight)
        chosen = [list(range(num_choices))] * num_gates if choices is None else [list(c) for c in choices]
        codes = 2 ** num_digits
        digits = [_digits(len(c)) for c in chosen]
        # digit_mask[g, j]: whether gate g uses binary digit j; code_to_choice[g, l, e]: code l of gate g is expert e.
        digit_mask = torch.tensor([[float(j < d) for j in range(self.num_digits)] for d in digits]).view(num_gates, 1, -1)
        code_to_choice = torch.zeros(num_gates, codes, num_choices)
        for g, experts in enumerate(chosen):
            code_to_choice[g, torch.arange(len(experts)), experts] = 1.0
        self.register_buffer("digit_mask", digit_mask, persistent=False)
        self.register_buffer("code_to_choice", code_to_choice, persistent=False)
        self.register_buffer("reachable_codes", code_to_choice.sum(-1), persistent=False)  # (G, codes)
        self.has_unreachable_codes = any(len(c) != 2 ** d for c, d in zip(chosen, digits))
        self.has_penalty = self.has_unreachable_codes or self.entropy_weight > 0
        self.pending_penalty: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's initialisation: digit logits uniform in ``+-width/100``, selector-weight logits
        in ``+-0.05`` (weights and biases)."""
        k, m = self.top_k, self.num_digits
        with torch.no_grad():
            linear = self.linear
            weight = linear.weight.view(linear.in_features, linear.num_stacks, linear.out_features) if linear.shared_input \
                else linear.weight.transpose(0, 1)  # (in, G, k (m + 1))
            for tensor in (weight, linear.bias):
                tensor[..., : k * m].uniform_(-self.smooth_step_width / 100, self.smooth_step_width / 100)
                tensor[..., k * m:].uniform_(-0.05, 0.05)

    def num_excluded_parameters(self) -> int:
        """Weights and biases of the digits a gate never uses (a gate over fewer experts than the most)."""
        unused = int((self.digit_mask == 0).sum())
        return unused * self.top_k * (self.linear.in_features + 1)

    def selector_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each selector's distribution over the codes and each gate's softmax over its selectors.

        Shape: ``(B, in)`` or ``(B, G, in)`` ``-> (B, G, k, 2^m)`` and ``(B, G, k)``.
        """
        k, m = self.top_k, self.num_digits
        logits = self.linear(self.gate_input(x))  # (B, G, k (m + 1))
        rows, gates = logits.shape[:2]
        steps = smooth_step(logits[..., : k * m].reshape(rows, gates, k, m), self.smooth_step_width) * self.digit_mask
        # Digit j doubles the codes: code l + 2^j takes S_j, code l takes 1 - S_j.
        codes = logits.new_ones(rows, gates, k, 1)
        for j in range(m):
            step = steps[..., j: j + 1]
            codes = torch.cat([codes * (1 - step), codes * step], dim=-1)
        return codes, torch.softmax(logits[..., k * m:], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, mixture = self.selector_weights(x)
        code_weights = torch.einsum("bgk,bgkl->bgl", mixture, codes)
        weights = torch.einsum("bgl,gle->bge", code_weights, self.code_to_choice)
        if self.has_penalty and self.training and torch.is_grad_enabled():
            self.pending_penalty = self._penalty(codes)
        if self.record:
            self.last_weights = weights.detach()
        return weights

    def _penalty(self, codes: torch.Tensor) -> torch.Tensor:
        terms = []
        if self.has_unreachable_codes:
            on_experts = torch.einsum("bgkl,gl->bgk", codes, self.reachable_codes)
            terms.append((1.0 / on_experts.clamp_min(_EPSILON) - 1.0).sum((1, 2)).mean())
        if self.entropy_weight > 0:
            entropy = -(codes * codes.clamp_min(_EPSILON).log()).sum((1, 2, 3)).mean()
            terms.append(self.entropy_weight * entropy)
        return sum(terms)

    def take_penalty(self) -> torch.Tensor | None:
        """The regularisation term of the last training forward, once: a second call returns None."""
        penalty, self.pending_penalty = self.pending_penalty, None
        return penalty

    def extra_repr(self) -> str:
        return f"k={self.top_k}, digits={self.num_digits}, smooth_step_width={self.smooth_step_width}"


def _digits(num_choices: int) -> int:
    """Binary digits that number ``num_choices`` experts (0 for one)."""
    return math.ceil(math.log2(num_choices)) if num_choices > 1 else 0
