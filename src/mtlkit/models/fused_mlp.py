"""A stack of ReLU MLPs as one autograd node with a hand-written backward.

Autograd's generic path for ``ReLU(Linear(x))`` allocates a fresh tensor for every activation and
every activation gradient, and between batched layers it moves activations between the batch-major
``[B, S, D]`` and stack-major ``[S, B, D]`` layouts. For experts of recommendation models those
activations are the largest tensors of the step (W2 in ``benchmarks/``: 2048 x 2048 floats), so that
memory traffic costs as much as a third of the GEMM time. Here:

* the ReLU runs in place on the buffer the GEMM has just written;
* a shared-input first layer is ``[x, 1] @ [W; b]``: the bias costs no broadcast copy, and one GEMM
  gives both its gradients;
* every batched matmul reads its operands through strided views (CPU BLAS takes any leading
  dimension); a batched layer's gradient is moved once into stack-major ``[S, B, D]``, with the ReLU
  mask applied on the way, and the gradient flowing into a batch-major layer below is written by
  ``bmm(out=...)`` straight into the layout that layer reads, so no other layout copy is made;
* the ReLU mask is applied in place to gradients this function has itself allocated.

The maths is that of :class:`~mtlkit.models.layers.StackedMLP` with ReLU, no norm and no dropout;
``tests/test_fused_kernels.py`` checks both agree, forward and backward.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.autograd.function import once_differentiable

__all__ = ["stacked_relu_mlp"]


def _relu_grad_(grad: torch.Tensor, activated: torch.Tensor) -> torch.Tensor:
    """``grad * (activated > 0)`` written into ``grad``."""
    return torch.ops.aten.threshold_backward.grad_input(grad, activated, 0, grad_input=grad)


def _with_ones_column(x: torch.Tensor) -> torch.Tensor:
    """``[x, 1]``: the bias becomes one more row of the weight, so one GEMM does both."""
    return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)


class _StackedReluMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, shared_input: bool, activate_last: bool, *params: torch.Tensor) -> torch.Tensor:
        weights, biases = params[0::2], params[1::2]
        num_stacks = biases[0].shape[0]
        batch = x.shape[0]
        activations: list[torch.Tensor] = []  # [B, S, width] views, after the ReLU
        first_operands: tuple[torch.Tensor, ...] = ()
        h = x
        for i, (weight, bias) in enumerate(zip(weights, biases)):
            if i == 0 and shared_input:
                # [x, 1] @ [W; b]: no broadcast copy of the bias into the output, and in backward one
                # GEMM gives the weight and bias gradients (no separate pass over the gradient).
                x_ones, weight_bias = _with_ones_column(x), torch.cat([weight, bias.view(1, -1)])
                out = torch.mm(x_ones, weight_bias).view(batch, num_stacks, -1)
                first_operands = (x_ones, weight_bias)
            else:
                out = torch.baddbmm(bias.unsqueeze(1), h.transpose(0, 1), weight).transpose(0, 1)
            if i < len(weights) - 1 or activate_last:
                out.relu_()
            activations.append(out)
            h = out
        ctx.shared_input, ctx.activate_last, ctx.num_layers = shared_input, activate_last, len(weights)
        ctx.save_for_backward(x, *weights, *activations, *first_operands)
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        num_layers = ctx.num_layers
        saved = ctx.saved_tensors
        x, weights, activations = saved[0], saved[1 : 1 + num_layers], saved[1 + num_layers : 1 + 2 * num_layers]
        needs = ctx.needs_input_grad  # (x, shared_input, activate_last, W0, b0, W1, b1, ...)
        batch, num_stacks = grad_out.shape[0], grad_out.shape[1]
        grads: list[torch.Tensor | None] = [None] * (2 * num_layers)
        grad_x = None
        # A batched layer's gradient is kept stack-major, [S, B, out] contiguous, which its two
        # batched GEMMs read fastest; a shared-input layer's batch-major, [B, S * out], for one mm.
        grad = grad_out  # [B, S, out], any layout, read-only
        owned = False
        for i in range(num_layers - 1, -1, -1):
            relu = i < num_layers - 1 or ctx.activate_last
            if i == 0 and ctx.shared_input:
                if relu:
                    grad = _relu_grad_(grad, activations[0]) if owned else torch.ops.aten.threshold_backward(grad, activations[0], 0)
                flat = grad.reshape(batch, -1)
                x_ones, weight_bias = saved[1 + 2 * num_layers :]
                if needs[3] or needs[4]:
                    both = torch.mm(x_ones.t(), flat)
                    grads[0], grads[1] = both[:-1], both[-1].view(num_stacks, -1)
                if needs[0]:
                    grad_x = torch.mm(flat, weight_bias.t())[:, :-1]
                break
            stacked = grad.transpose(0, 1)
            if owned:
                if relu:
                    _relu_grad_(stacked, activations[i].transpose(0, 1))
            else:
                # Move into a stack-major buffer of our own, with the ReLU mask applied on the way.
                moved = torch.empty(stacked.shape, dtype=grad.dtype, device=grad.device)
                if relu:
                    torch.ops.aten.threshold_backward.grad_input(stacked, activations[i].transpose(0, 1), 0, grad_input=moved)
                else:
                    moved.copy_(stacked)
                stacked = moved
            weight = weights[i]
            below = x if i == 0 else activations[i - 1]  # [B, S, in]
            if needs[4 + 2 * i]:
                grads[2 * i + 1] = stacked.sum(1)
            if needs[3 + 2 * i]:
                grads[2 * i] = torch.bmm(below.transpose(0, 1).transpose(1, 2), stacked)
            if i == 0 and not needs[0]:
                break
            if i == 0 or (i == 1 and ctx.shared_input):
                # Written straight into batch-major [B, S, in]: what the shared layer below reads,
                # and the layout of this function's input, whose consumers (the mixing's bmm,
                # PLE's expert inputs) are several times slower on a strided gradient.
                below_grad = torch.empty(batch, num_stacks, weight.shape[1], dtype=grad.dtype, device=grad.device)
                torch.bmm(stacked, weight.transpose(1, 2), out=below_grad.transpose(0, 1))
            else:
                below_grad = torch.bmm(stacked, weight.transpose(1, 2)).transpose(0, 1)
            if i == 0:
                grad_x = below_grad
            else:
                grad, owned = below_grad, True
        return (grad_x, None, None, *grads)


def stacked_relu_mlp(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    shared_input: bool,
    activate_last: bool,
) -> torch.Tensor:
    """``S`` ReLU MLPs of identical shape, forward and backward as one autograd node.

    Args:
        x: ``(B, in)`` when ``shared_input`` (the first layer is one matmul of all stacks), else
            ``(B, S, in)`` (any strides).
        weights: per layer, ``[in, S * out]`` for a shared-input first layer, else ``[S, in, out]``.
        biases: per layer, ``[S, out]``.
        shared_input: whether the first layer reads one input shared by all stacks.
        activate_last: whether the last layer is followed by the ReLU.

    Returns:
        ``(B, S, out)``; a strided view of a stack-major buffer when the last layer is batched.
    """
    params: list[torch.Tensor] = []
    for weight, bias in zip(weights, biases):
        params += [weight, bias]
    return _StackedReluMLP.apply(x, shared_input, activate_last, *params)
