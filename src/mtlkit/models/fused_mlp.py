"""A stack of ReLU MLPs as one autograd node with a hand-written backward.

Autograd's generic path for ``ReLU(Linear(x))`` allocates a fresh tensor for every activation and
every activation gradient, and between batched layers it moves activations between the batch-major
``[B, S, D]`` and stack-major ``[S, B, D]`` layouts. For experts of recommendation models those
activations are the largest tensors of the step (W2 in ``benchmarks/``: 2048 x 2048 floats), so that
memory traffic costs as much as a third of the GEMM time. Here:

* the ReLU runs in place on the buffer the GEMM has just written;
* a shared-input first layer is ``[x, 1] @ [W; b]``, and every layer below the last also writes a
  constant-1 column (weight 0, bias 1, kept by the ReLU), so every layer's bias is one more row of its
  GEMM operand: no broadcast copy of the bias into the output, and one GEMM gives both gradients;
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


def _layer_matrix(weight: torch.Tensor, bias: torch.Tensor, stacked: bool, extend: bool) -> torch.Tensor:
    """The GEMM operand of a layer whose input ends in a constant-1 column: ``[W; b]`` per stack.

    With ``extend`` every stack gets one more output column, of weight 0 and bias 1: after the ReLU it
    is the constant-1 column on which the next layer's bias rides.

    Shape: ``[in, S * out] -> [in + 1, S * (out + extend)]`` (shared input), or
    ``[S, in, out] -> [S, in + 1, out + extend]`` (stacked).
    """
    num_stacks, out = bias.shape
    if not extend:
        return torch.cat([weight, bias.unsqueeze(1)], dim=1) if stacked else torch.cat([weight, bias.view(1, -1)])
    in_features = weight.shape[-2]
    if stacked:
        matrix = weight.new_empty(num_stacks, in_features + 1, out + 1)
        weight_rows, bias_row = matrix[:, :in_features], matrix[:, in_features]
    else:
        matrix = weight.new_empty(in_features + 1, num_stacks, out + 1)
        weight_rows, bias_row = matrix[:in_features], matrix[in_features]
        weight = weight.view(in_features, num_stacks, out)
    weight_rows[..., :out] = weight
    weight_rows[..., out] = 0.0
    bias_row[:, :out] = bias
    bias_row[:, out] = 1.0
    return matrix if stacked else matrix.view(in_features + 1, -1)


class _StackedReluMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, shared_input: bool, activate_last: bool, *params: torch.Tensor) -> torch.Tensor:
        weights, biases = params[0::2], params[1::2]
        num_stacks = biases[0].shape[0]
        batch, num_layers = x.shape[0], len(weights)
        # Every layer below the last also writes a constant-1 column (weight 0, bias 1, kept by the
        # ReLU), so every bias is one more row of its layer's GEMM operand: no broadcast copy of the
        # bias into the output, and one GEMM gives the weight and bias gradients.
        activations: list[torch.Tensor] = []  # [B, S, out + extend] views, after the ReLU
        matrices: list[torch.Tensor] = []
        first_input = x
        h = x
        for i, (weight, bias) in enumerate(zip(weights, biases)):
            extend = i < num_layers - 1
            if i == 0 and shared_input:
                first_input = _with_ones_column(x)
                matrix = _layer_matrix(weight, bias, stacked=False, extend=extend)
                out = torch.mm(first_input, matrix).view(batch, num_stacks, -1)
            elif i == 0:
                # A per-stack input has no constant column: here baddbmm broadcasts the bias.
                matrix = weight
                if extend:
                    matrix = torch.cat([weight, weight.new_zeros(num_stacks, weight.shape[1], 1)], dim=2)
                    bias = torch.cat([bias, bias.new_ones(num_stacks, 1)], dim=1)
                out = torch.baddbmm(bias.unsqueeze(1), x.transpose(0, 1), matrix).transpose(0, 1)
            else:
                matrix = _layer_matrix(weight, bias, stacked=True, extend=extend)
                out = torch.bmm(h.transpose(0, 1), matrix).transpose(0, 1)
            if extend or activate_last:
                out.relu_()
            activations.append(out)
            matrices.append(matrix)
            h = out
        ctx.shared_input, ctx.activate_last, ctx.num_layers = shared_input, activate_last, num_layers
        ctx.save_for_backward(first_input, *matrices, *activations)
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        num_layers = ctx.num_layers
        saved = ctx.saved_tensors
        first_input, matrices, activations = saved[0], saved[1 : 1 + num_layers], saved[1 + num_layers :]
        needs = ctx.needs_input_grad  # (x, shared_input, activate_last, W0, b0, W1, b1, ...)
        batch, num_stacks = grad_out.shape[0], grad_out.shape[1]
        grads: list[torch.Tensor | None] = [None] * (2 * num_layers)
        grad_x = None
        # A batched layer's gradient is kept stack-major, [S, B, out] contiguous, which its two
        # batched GEMMs read fastest; a shared-input layer's batch-major, [B, S * out], for one mm.
        grad = grad_out  # [B, S, out (+ 1)], any layout, read-only unless owned
        owned = False
        for i in range(num_layers - 1, -1, -1):
            relu = i < num_layers - 1 or ctx.activate_last
            extend = i < num_layers - 1
            out = activations[i].shape[2] - extend  # this layer's real width
            if i == 0 and ctx.shared_input:
                if relu:
                    grad = _relu_grad_(grad, activations[0]) if owned else torch.ops.aten.threshold_backward(grad, activations[0], 0)
                if extend:
                    grad[:, :, out].zero_()  # the constant column's gradient is not the model's
                flat = grad.reshape(batch, -1)
                if needs[3] or needs[4]:
                    both = torch.mm(first_input.t(), flat).view(first_input.shape[1], num_stacks, -1)[:, :, :out]
                    grads[0], grads[1] = both[:-1].reshape(first_input.shape[1] - 1, -1), both[-1]
                if needs[0]:
                    grad_x = torch.mm(flat, matrices[0].t())[:, :-1]
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
            if extend:
                stacked[:, :, out].zero_()
            matrix = matrices[i]
            if i == 0:  # per-stack input without a constant column
                if needs[4]:
                    grads[1] = stacked.sum(1)[:, :out]
                if needs[3]:
                    grads[0] = torch.bmm(first_input.transpose(0, 1).transpose(1, 2), stacked)[:, :, :out]
            elif needs[3 + 2 * i] or needs[4 + 2 * i]:
                # One GEMM: the constant column of the input gives the bias gradient as its last row.
                both = torch.bmm(activations[i - 1].transpose(0, 1).transpose(1, 2), stacked)[:, :, :out]
                grads[2 * i], grads[2 * i + 1] = both[:, :-1], both[:, -1]
            if i == 0 and not needs[0]:
                break
            if i == 0 or (i == 1 and ctx.shared_input):
                # Written straight into batch-major [B, S, in]: what the shared layer below reads,
                # and the layout of this function's input, whose consumers (the mixing's bmm,
                # PLE's expert inputs) are several times slower on a strided gradient.
                below_grad = torch.empty(batch, num_stacks, matrix.shape[1], dtype=grad.dtype, device=grad.device)
                torch.bmm(stacked, matrix.transpose(1, 2), out=below_grad.transpose(0, 1))
            else:
                below_grad = torch.bmm(stacked, matrix.transpose(1, 2)).transpose(0, 1)
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
