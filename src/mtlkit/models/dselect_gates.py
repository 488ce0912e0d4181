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
from torch.autograd.function import once_differentiable

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
        # top_k: the selectors, at most that many experts per row once they have converged.
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
        self.all_digits_used = all(d == self.num_digits for d in digits)
        self.codes_are_experts = codes == num_choices and all(c == list(range(num_choices)) for c in chosen)
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
        logits = self.linear.forward_batch_last(self.gate_input(x))
        _, codes, mixture = _dselect_ops(logits, *self.selector_structure())
        return codes.permute(3, 0, 1, 2), mixture.permute(2, 0, 1)

    def selector_structure(self) -> tuple[int, int, float, torch.Tensor | None, torch.Tensor | None]:
        """``(k, m, width, digit mask or None, code-to-expert map or None)``, None where a gate uses
        every digit or where code ``l`` is expert ``l`` for every gate (then nothing is multiplied)."""
        mask = None if self.all_digits_used else self.digit_mask.view(self.linear.num_stacks, 1, self.num_digits, 1)
        code_map = None if self.codes_are_experts else self.code_to_choice.transpose(1, 2)
        return self.top_k, self.num_digits, self.smooth_step_width, mask, code_map

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.linear.forward_batch_last(self.gate_input(x))  # (G, k (m + 1), B)
        if torch.compiler.is_compiling():
            weights, codes, _ = _dselect_ops(logits, *self.selector_structure())
        else:
            weights, codes = _DSelectKWeights.apply(logits, *self.selector_structure())
        if self.has_penalty and self.training and torch.is_grad_enabled():
            self.pending_penalty = self.penalty_of(codes)
        weights = weights.permute(2, 0, 1)
        if self.record:
            self.last_weights = weights.detach()
        return weights

    def penalty_of(self, codes: torch.Tensor) -> torch.Tensor:
        """The regularisation terms of ``codes`` ``(G, k, 2^m, B)``: per row, summed over gates and
        selectors, then the mean over rows."""
        rows = codes.shape[-1]
        terms = []
        if self.has_unreachable_codes:
            on_experts = (codes * self.reachable_codes[:, None, :, None]).sum(2)  # (G, k, B)
            terms.append((1.0 / on_experts.clamp_min(_EPSILON) - 1.0).sum() / rows)
        if self.entropy_weight > 0:
            entropy = -(codes * codes.clamp_min(_EPSILON).log()).sum() / rows
            terms.append(self.entropy_weight * entropy)
        return sum(terms)

    def penalty_with_gradient(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`penalty_of` and its gradient with respect to ``codes``, without autograd (for the
        small-mixture node, whose backward scales the gradient by the penalty's). Shapes: ``codes``
        ``(G, k, 2^m, B)`` ``->`` a scalar and ``(G, k, 2^m, B)``."""
        rows = codes.shape[-1]
        value, gradient = codes.new_zeros(()), torch.zeros_like(codes)
        if self.has_unreachable_codes:
            reachable = self.reachable_codes[:, None, :, None]
            on_experts = (codes * reachable).sum(2, keepdim=True)  # (G, k, 1, B)
            floored = on_experts.clamp_min(_EPSILON)
            value += (1.0 / floored - 1.0).sum() / rows
            # d(1 / on - 1) / d code = -reachable / on^2 where on is not floored (clamp's own rule: >= passes).
            slope = torch.where(on_experts >= _EPSILON, floored.square().reciprocal().neg_(), 0.0)
            gradient.addcmul_(slope, reachable, value=1.0 / rows)
        if self.entropy_weight > 0:
            floored = codes.clamp_min(_EPSILON)
            logs = floored.log()
            value -= self.entropy_weight * (codes * logs).sum() / rows
            # d(-c log max(c, eps)) / dc = -(log max(c, eps) + [c >= eps]).
            gradient.sub_(logs.add_((codes >= _EPSILON).to(codes.dtype)), alpha=self.entropy_weight / rows)
        return value, gradient

    def take_penalty(self) -> torch.Tensor | None:
        """The regularisation term of the last training forward, once: a second call returns None."""
        penalty, self.pending_penalty = self.pending_penalty, None
        return penalty

    def extra_repr(self) -> str:
        return f"k={self.top_k}, digits={self.num_digits}, smooth_step_width={self.smooth_step_width}"


def _digits(num_choices: int) -> int:
    """Binary digits that number ``num_choices`` experts (0 for one)."""
    return math.ceil(math.log2(num_choices)) if num_choices > 1 else 0


def _dselect_ops(logits: torch.Tensor, k: int, m: int, width: float, digit_mask: torch.Tensor | None,
                 code_map: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gates' weights from their logits in differentiable operators, batch-last (for
    ``torch.compile`` to trace, and the reference :class:`_DSelectKWeights` is checked against).

    Shape: logits ``(G, k (m + 1), B)``; ``digit_mask`` ``(G, 1, m, 1)``, ``code_map`` ``(G, E, 2^m)``
    ``-> `` weights ``(G, E, B)``, codes ``(G, k, 2^m, B)``, selector mixture ``(G, k, B)``.
    """
    gates, _, rows = logits.shape
    steps = smooth_step(logits[:, : k * m].reshape(gates, k, m, rows), width)
    if digit_mask is not None:
        steps = steps * digit_mask
    # Digit j doubles the codes: code l + 2^j takes S_j, code l takes 1 - S_j.
    codes = logits.new_ones(gates, k, 1, rows)
    for j in range(m):
        step = steps[:, :, j: j + 1]
        codes = torch.cat([codes * (1 - step), codes * step], dim=2)
    mixture = torch.softmax(logits[:, k * m:], dim=1)
    weights = (mixture.unsqueeze(2) * codes).sum(1)  # (G, 2^m, B)
    if code_map is not None:
        weights = torch.bmm(code_map, weights)
    return weights, codes, mixture


def dselect_weights_forward(logits: torch.Tensor, k: int, m: int, width: float, digit_mask: torch.Tensor | None,
                            code_map: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """:func:`_dselect_ops`'s weights and codes without autograd, and what
    :func:`dselect_weights_backward` needs (for :class:`_DSelectKWeights` and the small-mixture node)."""
    gates, _, rows = logits.shape
    u = logits[:, : k * m].reshape(gates, k, m, rows).div(width).clamp_(-0.5, 0.5)
    steps = (u * u).mul_(-2.0).add_(1.5).mul_(u).add_(0.5)
    if digit_mask is not None:
        steps.mul_(digit_mask)
    complements = 1.0 - steps
    prefixes = []  # the codes before digit j, for j >= 1: (G, k, 2^j, B)
    codes = torch.stack([complements[:, :, 0], steps[:, :, 0]], 2) if m else logits.new_ones(gates, k, 1, rows)
    for j in range(1, m):
        prefixes.append(codes)
        codes = torch.cat([codes * complements[:, :, j: j + 1], codes * steps[:, :, j: j + 1]], dim=2)
    mixture = torch.softmax(logits[:, k * m:], dim=1)
    weights = (mixture.unsqueeze(2) * codes).sum(1)
    if code_map is not None:
        weights = torch.bmm(code_map, weights)
    return weights, codes, (u, steps, complements, codes, mixture, digit_mask, code_map, *prefixes)


def dselect_weights_backward(saved: Sequence[torch.Tensor | None], k: int, m: int, width: float,
                             grad_weights: torch.Tensor | None, grad_codes: torch.Tensor | None) -> torch.Tensor | None:
    """The logits' gradient ``(G, k (m + 1), B)`` from the weights' ``(G, E, B)`` and the codes'
    (either may be None; None if both are), ``saved`` from :func:`dselect_weights_forward`."""
    u, steps, complements, codes, mixture, digit_mask, code_map, *prefixes = saved
    gates, _, rows = mixture.shape
    grad_mixture = None
    if grad_weights is not None:
        # The weights leave as a permuted view: their gradient arrives strided, and is read twice.
        grad_weights = grad_weights.contiguous()
        grad_code_weights = grad_weights if code_map is None else torch.bmm(code_map.transpose(1, 2), grad_weights)
        grad_code_weights = grad_code_weights.unsqueeze(1)  # (G, 1, 2^m, B)
        grad_mixture = (grad_code_weights * codes).sum(2)
        from_weights = mixture.unsqueeze(2) * grad_code_weights
        grad_codes = from_weights if grad_codes is None else from_weights.add_(grad_codes)
    if grad_codes is None:
        return None
    grad_steps = torch.empty_like(steps)
    for j in range(m - 1, -1, -1):
        half = 1 << j
        low, high = grad_codes[:, :, :half], grad_codes[:, :, half:]
        if j == 0:
            torch.sub(high[:, :, 0], low[:, :, 0], out=grad_steps[:, :, 0])
            break
        torch.sum((high - low).mul_(prefixes[j - 1]), 2, out=grad_steps[:, :, j])
        grad_codes = torch.addcmul(low * complements[:, :, j: j + 1], high, steps[:, :, j: j + 1])
    if digit_mask is not None:
        grad_steps.mul_(digit_mask)
    grad_steps.mul_((u * u).mul_(-6.0 / width).add_(1.5 / width))
    grad_selectors = torch.zeros_like(mixture) if grad_mixture is None else \
        torch._softmax_backward_data(grad_mixture, mixture, 1, mixture.dtype)
    return torch.cat([grad_steps.view(gates, k * m, rows), grad_selectors], 1)


class _DSelectKWeights(torch.autograd.Function):
    """:func:`_dselect_ops` as one autograd node with a written-out backward
    (:func:`dselect_weights_forward`, :func:`dselect_weights_backward`).

    At W1's sizes (1,024 rows, 2 gates of 2 selectors over 8 experts) the gate is a few dozen
    operators on tensors of a few thousand floats, each an autograd node whose fixed cost outweighs
    its work: forward and backward took 1.26-1.45 ms against 0.15-0.19 ms for a softmax gate. Here
    the forward runs without autograd and the backward retraces the codes' doubling digit by digit,
    the last first: ``c' = [c (1 - S_j), c S_j]`` gives ``dS_j = sum_l (dc'_hi - dc'_lo) c`` and
    ``dc = dc'_lo (1 - S_j) + dc'_hi S_j``. The smooth step's slope ``(1.5 - 6 u^2) / width`` is exactly
    0 at the clamped ends ``u = +-1/2``, so it needs no mask of its own.
    """

    @staticmethod
    def forward(ctx, logits, k, m, width, digit_mask, code_map):
        weights, codes, saved = dselect_weights_forward(logits, k, m, width, digit_mask, code_map)
        ctx.set_materialize_grads(False)
        ctx.structure = (k, m, width)
        ctx.save_for_backward(*saved)
        return weights, codes

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_weights, grad_codes):
        grad_logits = dselect_weights_backward(ctx.saved_tensors, *ctx.structure, grad_weights, grad_codes)
        return grad_logits, None, None, None, None, None
