"""A stack of ReLU MLPs as one autograd node with a hand-written backward.

Autograd's generic path for ``ReLU(Linear(x))`` allocates a fresh tensor for every activation and
every activation gradient, and between batched layers it moves activations between the batch-major
``[B, S, D]`` and stack-major ``[S, B, D]`` layouts. For experts of recommendation models those
activations are the largest tensors of the step (W2 in ``benchmarks/``: 2048 x 2048 floats), so that
memory traffic costs as much as a third of the GEMM time. Here:

* the ReLU runs in place on the buffer the GEMM has just written;
* every batched matmul reads its operands through strided views (CPU BLAS takes any leading
  dimension), and the input gradient of a shared-input layer is written by ``bmm(out=...)`` straight
  into the batch-major buffer the next GEMM needs, so no layout copy is made;
* the ReLU mask is applied in place to gradients this function has itself allocated.

The maths is that of :class:`~mtlkit.models.layers.StackedMLP` with ReLU, no norm and no dropout;
``tests/test_fused_mlp.py`` checks both agree, forward and backward.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.autograd.function import once_differentiable

__all__ = ["stacked_relu_mlp"]


def _relu_grad_(grad: torch.Tensor, activated: torch.Tensor) -> torch.Tensor:
    """``grad * (activated > 0)`` written into ``grad``."""
    return torch.ops.aten.threshold_backward.grad_input(grad, activated, 0, grad_input=grad)


class _StackedReluMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, shared_input: bool, activate_last: bool, *params: torch.Tensor) -> torch.Tensor:
        weights, biases = params[0::2], params[1::2]
        num_stacks = biases[0].shape[0]
        batch = x.shape[0]
        activations: list[torch.Tensor] = []  # [B, S, width] views, after the ReLU
        h = x
        for i, (weight, bias) in enumerate(zip(weights, biases)):
            if i == 0 and shared_input:
                out = torch.addmm(bias.view(1, -1), x, weight).view(batch, num_stacks, -1)
            else:
                out = torch.baddbmm(bias.unsqueeze(1), h.transpose(0, 1), weight).transpose(0, 1)
            if i < len(weights) - 1 or activate_last:
                out.relu_()
            activations.append(out)
            h = out
        ctx.shared_input, ctx.activate_last = shared_input, activate_last
        ctx.save_for_backward(x, *params, *activations)
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        saved = ctx.saved_tensors
        x = saved[0]
        num_layers = (len(saved) - 1) // 3
        weights = saved[1 : 1 + 2 * num_layers : 2]
        activations = saved[1 + 2 * num_layers :]
        batch, num_stacks = grad_out.shape[0], grad_out.shape[1]
        grads: list[torch.Tensor | None] = [None] * (2 * num_layers)
        grad_x = None
        grad = grad_out
        owned = False  # grad_out belongs to autograd and must not be written
        for i in range(num_layers - 1, -1, -1):
            if i < num_layers - 1 or ctx.activate_last:
                grad = _relu_grad_(grad, activations[i]) if owned else torch.ops.aten.threshold_backward(grad, activations[i], 0)
            grads[2 * i + 1] = grad.sum(0)
            weight = weights[i]
            if i == 0 and ctx.shared_input:
                flat = grad.reshape(batch, -1)
                grads[0] = torch.mm(x.t(), flat) if ctx.needs_input_grad[3] else None
                if ctx.needs_input_grad[0]:
                    grad_x = torch.mm(flat, weight.t())
                break
            below = x if i == 0 else activations[i - 1]  # [B, S, in]
            if ctx.needs_input_grad[3 + 2 * i]:
                grads[2 * i] = torch.bmm(below.transpose(0, 1).transpose(1, 2), grad.transpose(0, 1))
            if i == 0 and not ctx.needs_input_grad[0]:
                break
            # Written batch-major, the layout of the layer below, so its GEMMs read it as is.
            grad_below = torch.empty(batch, num_stacks, weight.shape[1], dtype=grad.dtype, device=grad.device)
            torch.bmm(grad.transpose(0, 1), weight.transpose(1, 2), out=grad_below.transpose(0, 1))
            if i == 0:
                grad_x = grad_below
            else:
                grad, owned = grad_below, True
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
