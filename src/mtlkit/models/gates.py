"""Softmax gates over experts, all gates of a level in one (batched) matmul, and the gated mixing.

Gates choose among few experts (8 in the papers). A softmax over rows of 8 floats runs PyTorch's
CPU kernel row by row (W1 in ``benchmarks/``: 132 us for ``[1024, 2, 8]``), so the gate logits are
computed batch-last, ``(G, E, B)``, where the softmax over ``E`` is an outer-dimension reduction
vectorised along the batch: gate logits, softmax and their gradients 117 us against 182 us in the
batch-major layout. The mixing's ``bmm`` backward has the same per-row problem at these sizes
(197 us for a mixing gradient that two multiply-adds do in 47 us) and is an autograd function here.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from mtlkit.errors import ConfigError
from mtlkit.models.layers import StackedLinear

__all__ = ["GateBank", "mix_experts", "check_top_k", "drop_choices", "keep_top_k"]

# The largest gates x experts x width of a mixing whose expert gradient is summed over gates instead
# of a bmm (measured crossover, see above).
_SMALL_MIXING = 512
# ATen's CPU bmm multiplies matrices of fewer than 400 multiply-adds in a scalar loop and larger ones
# through BLAS. Over W1's 1,024 rows the loop takes 98 us for 2 gates x 8 experts x 16 (146 us for 3
# gates) while the BLAS path with the gates padded to 4 zero-filled rows takes 58 us, padding
# included; below about 192 the loop is as fast (1 gate: 50 us vs 57).
_BLAS_BMM = 400
_PAD_MIXING_FROM = 192


class _MixExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_weights: torch.Tensor, expert_outputs: torch.Tensor,
                expert_gradient_mask: torch.Tensor | None = None) -> torch.Tensor:
        num_gates, num_experts = gate_weights.shape[1:]
        per_gate = num_experts * expert_outputs.shape[2]
        if _PAD_MIXING_FROM <= num_gates * per_gate < _BLAS_BMM:
            # Zero gate rows up to ATen's BLAS size: the padded product is cheaper than the loop.
            rows = -(-_BLAS_BMM // per_gate)
            padded = F.pad(gate_weights, (0, 0, 0, rows - num_gates))
            ctx.save_for_backward(padded[:, :num_gates], expert_outputs, expert_gradient_mask)
            return torch.bmm(padded, expert_outputs)[:, :num_gates]
        # Gates arrive batch-last (a permuted view, see GateBank): one copy here, so that the bmm
        # and the backward's per-gate multiply-adds read each row's gate weights contiguously.
        gate_weights = gate_weights.contiguous()
        ctx.save_for_backward(gate_weights, expert_outputs, expert_gradient_mask)
        return torch.bmm(gate_weights, expert_outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        gate_weights, expert_outputs, expert_gradient_mask = ctx.saved_tensors
        grad_gates = grad_experts = None
        if ctx.needs_input_grad[0]:
            grad_gates = torch.bmm(grad, expert_outputs.transpose(1, 2))
        if ctx.needs_input_grad[1]:
            num_gates = gate_weights.shape[1]
            if expert_gradient_mask is not None:
                gate_weights = gate_weights * expert_gradient_mask.to(gate_weights.dtype)
            if gate_weights[0].numel() * grad.shape[2] <= _SMALL_MIXING:
                # Sum over the gates (tasks) of outer products: a loop over gates, not experts.
                grad_experts = gate_weights[:, 0, :, None] * grad[:, 0, None, :]
                for g in range(1, num_gates):
                    grad_experts.addcmul_(gate_weights[:, g, :, None], grad[:, g, None, :])
            else:
                grad_experts = torch.bmm(gate_weights.transpose(1, 2), grad)
        return grad_gates, grad_experts, None


class GateBank(nn.Module):
    """``num_gates`` gates ``softmax((W_g x + b_g) / temperature)``, each over ``num_choices`` experts.

    With ``shared_input=True`` all gates read one ``(B, in)`` selector and are a single matmul; otherwise
    gate ``g`` reads ``x[:, g]`` of a ``(B, G, in)`` input (one batched matmul). The weights are
    returned as a ``(B, G, E)`` view of a batch-last ``(G, E, B)`` tensor (see the module docstring).

    With ``choices``, gate ``g`` chooses only among the experts ``choices[g]`` (PLE: a task's gate sees
    its own experts and the shared ones, the shared gate all of them): the others get logit ``-inf``,
    hence weight exactly 0 and no gradient, so gates over different subsets of one level's experts
    are still one matmul and one softmax, and their weights are dense over the level's experts. The
    weights of the excluded entries never change, and ``MultiTaskModel.count_parameters`` leaves them out
    (:meth:`num_excluded_parameters`).

    The weights of the last forward are kept in ``last_weights`` only while ``record`` is True, so
    analysis costs nothing when it is off. ``gate_names`` and ``choice_names`` label the gates (the
    task each serves) and the experts for reports such as :mod:`mtlkit.reports.gate_usage`.

    With ``dropout`` > 0, in training, a gate ignores each expert for a row with that probability
    (Zhao et al., RecSys 2019: "Recommending what video to watch next", against gates that collapse
    onto a few experts); evaluation and prediction use every expert.

    With ``top_k``, each gate keeps only its ``top_k`` largest logits for a row and the softmax runs
    over those (Shazeer et al., ICLR 2017: a sparse mixture); the other experts get weight exactly 0
    and no gradient from that row. Every expert is still computed: on these sizes one dense batched
    matmul is cheaper than gathering each row's experts.

    With ``input_dim=0`` the gates are conditioned on the task only: a gate's weights are the same
    for every row (the softmax of its bias, learned), as in the static gates of Hazimeh et al.
    (NeurIPS 2021); the forward still takes the rows' input, for their number.

    ``logits_per_gate`` is for subclasses whose gates compute other than one logit per choice
    (:class:`~mtlkit.models.DSelectKGateBank`); such a gate may also leave a regularisation term of
    its training forward for the model to collect (:meth:`take_penalty`, ``has_penalty``).

    Shape: ``(B, in)`` or ``(B, G, in)`` ``-> (B, G, num_choices)``; each row sums to 1.
    """

    # Whether take_penalty can return a term (the model looks for such gates once).
    has_penalty = False

    def __init__(self, num_gates: int, input_dim: int, num_choices: int, shared_input: bool = True, temperature: float = 1.0,
                 choices: Sequence[Sequence[int]] | None = None, gate_names: Sequence[str] | None = None,
                 choice_names: Sequence[str] | None = None, dropout: float = 0.0, top_k: int | None = None,
                 logits_per_gate: int | None = None) -> None:
        super().__init__()
        if num_choices < 1:
            raise ConfigError(f"a gate needs at least one expert to choose from, got {num_choices}")
        if not temperature > 0:
            raise ConfigError(f"gate_temperature must be > 0, got {temperature}")
        # Subclasses whose gates compute something other than one logit per expert say how many.
        self.linear = StackedLinear(num_gates, input_dim, logits_per_gate or num_choices, shared_input=shared_input)
        self.temperature = float(temperature)
        self.dropout = float(dropout)
        check_top_k(top_k, num_choices, "the gate's experts")
        # A top_k that keeps every choice changes nothing: None, so that the fused paths stay open.
        self.top_k = top_k if top_k is not None and top_k < num_choices else None
        self.record = False
        self.last_weights: torch.Tensor | None = None
        self.gate_names = _labels(gate_names, num_gates, "gate")
        self.choice_names = _labels(choice_names, num_choices, "expert")
        self.choice_mask: torch.Tensor | None
        if choices is None:
            self.choice_mask = None
        else:
            if len(choices) != num_gates:
                raise ConfigError(f"choices: expected one list of experts per gate ({num_gates}), got {len(choices)}")
            mask = torch.full((num_gates, num_choices), float("-inf"))
            for g, chosen in enumerate(choices):
                if not chosen or any(not 0 <= e < num_choices for e in chosen):
                    raise ConfigError(f"choices[{g}]: expected expert indices in [0, {num_choices}), at least one, got {list(chosen)}")
                mask[g, list(chosen)] = 0.0
            self.register_buffer("choice_mask", mask, persistent=False)

    def take_penalty(self) -> torch.Tensor | None:
        """A term the last training forward adds to the objective; a softmax gate has none."""
        return None

    def num_excluded_parameters(self) -> int:
        """Weights and biases of excluded choices: parameters that can never affect the gates."""
        if self.choice_mask is None:
            return 0
        return int(torch.isinf(self.choice_mask).sum()) * (self.linear.in_features + 1)

    def gate_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the gates' linear map reads of ``x``: all of it, or none of its features for gates
        conditioned on the task only (``input_dim=0``). Shape: ``(B, [G,] in) -> (B, [G,] in or 0)``."""
        return x[..., :0] if self.linear.in_features == 0 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.linear.bias if self.choice_mask is None else self.linear.bias + self.choice_mask
        logits = self.linear.forward_batch_last(self.gate_input(x), bias)  # (G, E, B)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        if self.dropout > 0 and self.training:
            logits = drop_choices(logits, self.dropout, self.choice_mask)
        if self.top_k is not None:
            logits = keep_top_k(logits, self.top_k)
        weights = torch.softmax(logits, dim=1).permute(2, 0, 1)
        if self.record:
            self.last_weights = weights.detach()
        return weights


def drop_choices(logits: torch.Tensor, p: float, choice_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Each gate ignores each of its experts for a row with probability ``p`` (logit -inf: the
    softmax renormalises over the rest); a row that would lose them all keeps them all, and a choice
    ``choice_mask`` excludes (``-inf``) stays excluded. Shape: batch-last ``(G, E, B) -> (G, E, B)``,
    mask ``(G, E)``."""
    keep = torch.rand_like(logits) >= p
    if choice_mask is not None:
        allowed = torch.isfinite(choice_mask)[:, :, None]
        keep &= allowed
        keep |= allowed & ~keep.any(dim=1, keepdim=True)
    else:
        keep |= ~keep.any(dim=1, keepdim=True)
    return logits.masked_fill(~keep, float("-inf"))


# Up to this many experts a gate's top k is found by counting, for each logit, the logits above it.
_RANK_BY_COUNTING = 16


def keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Logits below each gate's ``k``-th largest for a row set to -inf (ties at the threshold are
    all kept; an excluded choice's -inf stays -inf). Shape: batch-last ``(G, E, B) -> (G, E, B)``."""
    if logits.shape[1] <= _RANK_BY_COUNTING:
        # A logit is below the k-th largest exactly when at least k logits are above it. The E x E
        # comparisons run along the batch; topk sorts each row of a few floats on its own (W1's
        # (2, 8, 1,024): 52 against 66 us; 16 experts: 142 against 332 us).
        above = (logits.unsqueeze(1) > logits.unsqueeze(2)).sum(2, dtype=torch.uint8)
        return logits.masked_fill(above >= k, float("-inf"))
    threshold = logits.topk(k, dim=1).values[:, -1:]  # (G, 1, B)
    return logits.masked_fill(logits < threshold, float("-inf"))


def check_top_k(value: object, num_experts: int, experts: str) -> None:
    """Validate a config's ``gate_top_k``: null or an integer in ``[1, num_experts]`` (``experts`` names
    what bounds it, for the error)."""
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= num_experts:
        raise ConfigError(f"gate_top_k: expected null or an integer from 1 to {experts} ({num_experts}), got {value!r}")


def _labels(names: Sequence[str] | None, count: int, kind: str) -> list[str]:
    if names is None:
        return [f"{kind} {i}" for i in range(count)]
    if len(names) != count:
        raise ConfigError(f"{kind}_names: expected {count} names, got {len(names)}")
    return list(names)


def mix_experts(gate_weights: torch.Tensor, expert_outputs: torch.Tensor,
                expert_gradient_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Gate-weighted sum of expert outputs.

    ``expert_gradient_mask`` ``(G, E)`` (None: all ones) scales the gradient each gate's weight
    passes into each expert, not the output: with 0, gate ``g`` reads expert ``e`` as if detached
    (STEM's stop-gradients), and the gate's own weights still receive their full gradient.

    Shape: gates ``(B, G, E)``, experts ``(B, E, D)`` (any strides) ``-> (B, G, D)``.
    """
    return _MixExperts.apply(gate_weights, expert_outputs, expert_gradient_mask)
