"""A stack of ReLU MLPs as one autograd node with a hand-written backward.

Autograd's generic path for ``ReLU(Linear(x))`` allocates a fresh tensor for every activation and
every activation gradient, and between batched layers it moves activations between the batch-major
``[B, S, D]`` and stack-major ``[S, B, D]`` layouts. For experts of recommendation models those
activations are the largest tensors of the step (W2 in ``benchmarks/``: 2048 x 2048 floats), so that
memory traffic costs as much as a third of the GEMM time. Here:

* the ReLU runs in place on the buffer the GEMM has just written, or is the pass that writes it
  there (where oneDNN runs a batched GEMM as one call per stack, ``models/cpu_gemm.py``);
* a shared-input first layer is ``[x, 1] @ [W; b]``, and every layer below the last also writes a
  constant-1 column (weight 0, bias 1, kept by the ReLU), so every layer's bias is one more row of its
  GEMM operand: no broadcast copy of the bias into the output, and one GEMM gives both gradients;
* every batched matmul reads its operands through strided views (CPU BLAS takes any leading
  dimension); a batched layer's gradient is moved once into stack-major ``[S, B, D]``, with the ReLU
  mask applied on the way, and the gradient flowing into a layer below is written straight into the
  layout that layer reads, with that layer's ReLU mask applied as it is written, so no other layout
  copy or mask pass is made.

Forwards that record no gradient (evaluation, prediction, serving) need none of this: there every
GEMM runs on the parameters as stored, without a bias, and the bias is added in the ReLU's own pass
(``aten::_add_relu_``), so no operand is copied and every GEMM keeps the layer's own width (the
constant column's widths, 129, 257 and 514, made ESMM's inference 20 % slower on an AMD EPYC), and
no GEMM reads back a broadcast copy of its bias (``docs/performance-log.md``, rounds 9 and 11).

The maths is that of :class:`~mtlkit.models.layers.StackedMLP` with ReLU, no norm and no dropout;
``tests/test_fused_kernels.py`` checks both agree, forward and backward.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.autograd.function import once_differentiable

from mtlkit.models import cpu_gemm

__all__ = ["stacked_relu_mlp"]


def _relu_grad_(grad: torch.Tensor, activated: torch.Tensor) -> torch.Tensor:
    """``grad * (activated > 0)`` written into ``grad``."""
    return torch.ops.aten.threshold_backward.grad_input(grad, activated, 0, grad_input=grad)


def _add_relu_(out: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``relu(out + bias)`` written into ``out`` in one pass (``bias`` broadcast to ``out``'s shape)."""
    return torch.ops.aten._add_relu_(out, bias)


def _relu_into(src: torch.Tensor, dst: torch.Tensor, entry: int | None = None) -> None:
    """``dst = relu(src)`` (a :data:`~mtlkit.models.cpu_gemm.Pointwise`)."""
    torch.clamp_min(src, 0, out=dst)


def _relu_mask_into(activated: torch.Tensor) -> cpu_gemm.Pointwise:
    """The pointwise ``dst = src * (activated > 0)``: a gradient through the ReLU whose output is
    ``activated`` (the whole batched output's, sliced per entry)."""
    def write(src: torch.Tensor, dst: torch.Tensor, entry: int | None) -> None:
        torch.ops.aten.threshold_backward.grad_input(src, activated if entry is None else activated[entry], 0, grad_input=dst)
    return write


def _bias_into(bias: torch.Tensor, relu: bool) -> cpu_gemm.Pointwise:
    """The pointwise ``dst = src + bias``, then the ReLU if ``relu``, in one pass (``bias`` broadcast to
    the whole output's shape, sliced per entry)."""
    def write(src: torch.Tensor, dst: torch.Tensor, entry: int | None) -> None:
        entry_bias = bias if entry is None else bias[entry]
        if relu and src is dst:  # the in-place form, which torch.export also traces
            _add_relu_(dst, entry_bias)
        elif relu:
            torch.ops.aten._add_relu.out(src, entry_bias, out=dst)
        else:
            torch.add(src, entry_bias, out=dst)
    return write


def _with_ones_column(x: torch.Tensor) -> torch.Tensor:
    """``[x, 1]``: the bias becomes one more row of the weight, so one GEMM does both."""
    return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)


def _layer_matrix(weight: torch.Tensor, bias: torch.Tensor, stacked: bool, extend: bool) -> torch.Tensor:
    """The GEMM operand of a layer whose input ends in a constant-1 column: ``[W; b]`` per stack.

    With ``extend`` every stack gets one more output column, of weight 0 and bias 1: after the ReLU it
    is the constant-1 column on which the next layer's bias rides.

    Shape: ``[in, S, out]`` (one input shared by the stacks, any strides) ``-> [in + 1, S * (out + extend)]``,
    or ``[S, in, out] -> [S, in + 1, out + extend]`` (stacked).
    """
    num_stacks, out = bias.shape
    in_features = weight.shape[-2] if stacked else weight.shape[0]
    if stacked:
        matrix = weight.new_empty(num_stacks, in_features + 1, out + extend)
        weight_rows, bias_row = matrix[:, :in_features], matrix[:, in_features]
    else:
        matrix = weight.new_empty(in_features + 1, num_stacks, out + extend)
        weight_rows, bias_row = matrix[:in_features], matrix[in_features]
    weight_rows[..., :out] = weight
    bias_row[:, :out] = bias
    if extend:
        weight_rows[..., out] = 0.0
        bias_row[:, out] = 1.0
    return matrix if stacked else matrix.view(in_features + 1, -1)


def _operands(weights, biases, group_sizes: tuple[int, ...] | None, shared: bool) -> tuple[list, list]:
    """The GEMM operands of every layer: per input group of the first layer ``[in + 1, n_g * width]``
    (with ``group_sizes``), and per batched layer its ``[S, in (+ 1), width]`` weight (the first one
    without a constant input column when each stack reads its own input)."""
    num_layers, num_stacks = len(weights), biases[0].shape[0]
    first_matrices, matrices = [], []
    for i, (weight, bias) in enumerate(zip(weights, biases)):
        extend = i < num_layers - 1
        if i == 0 and group_sizes is not None:
            start = 0
            for size in group_sizes:
                group_weight = weight.view(weight.shape[0], num_stacks, -1) if shared else weight[start : start + size].transpose(0, 1)
                first_matrices.append(_layer_matrix(group_weight, bias[start : start + size], stacked=False, extend=extend))
                start += size
        elif i == 0:
            # A per-stack input has no constant column: the forward's baddbmm broadcasts the bias.
            matrices.append(torch.cat([weight, weight.new_zeros(num_stacks, weight.shape[1], 1)], dim=2) if extend else weight)
        else:
            matrices.append(_layer_matrix(weight, bias, stacked=True, extend=extend))
    return first_matrices, matrices


class _StackedReluMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group_sizes: tuple[int, ...] | None, activate_last: bool,
                *params: torch.Tensor) -> torch.Tensor:
        weights, biases = params[0::2], params[1::2]
        num_stacks = biases[0].shape[0]
        batch, num_layers = x.shape[0], len(weights)
        shared = x.dim() == 2
        first_matrices, matrices = _operands(weights, biases, group_sizes, shared)
        # Layers below the last carry the constant-1 column (module docstring), hence "+ extend".
        activations: list[torch.Tensor] = []  # [B, S, out + extend] views, after the ReLU
        first_inputs: list[torch.Tensor] = []  # per input group: [x_g, 1]
        h = x
        for i, bias in enumerate(biases):
            extend = i < num_layers - 1
            relu = extend or activate_last
            # Where the GEMM's result is written into place, the ReLU is that write.
            write = _relu_into if relu else None
            if i == 0 and group_sizes is not None:
                # Stacks reading one input (all of them, or a run of them) share one GEMM.
                width = bias.shape[1] + extend
                if len(group_sizes) == 1:  # one GEMM writes the whole layer, through the machine's library
                    first_inputs.append(_with_ones_column(x if shared else x[:, 0]))
                    out = cpu_gemm.matmul(first_inputs[-1], first_matrices[0]).view(batch, num_stacks, width)
                    if relu:
                        out.relu_()
                else:
                    out = x.new_empty(batch, num_stacks, width)
                    flat_out, start = out.view(batch, -1), 0
                    for g, size in enumerate(group_sizes):
                        first_inputs.append(_with_ones_column(x[:, g]))
                        columns = flat_out[:, start * width : (start + size) * width]
                        cpu_gemm.matmul_into(first_inputs[-1], first_matrices[g], columns, write)
                        start += size
            elif i == 0:
                bias = torch.cat([bias, bias.new_ones(num_stacks, 1)], dim=1) if extend else bias
                out = torch.baddbmm(bias.unsqueeze(1), x.transpose(0, 1), matrices[0]).transpose(0, 1)
                if relu:
                    out.relu_()
            else:
                matrix = matrices[i - (group_sizes is not None)]
                out = cpu_gemm.bmm_into(h.transpose(0, 1), matrix, x.new_empty(num_stacks, batch, matrix.shape[2]), write).transpose(0, 1)
            activations.append(out)
            h = out
        ctx.group_sizes, ctx.activate_last, ctx.num_layers = group_sizes, activate_last, num_layers
        ctx.input_shape, ctx.num_first = x.shape, len(first_inputs)
        ctx.save_for_backward(x if group_sizes is None else None, *first_inputs, *first_matrices, *matrices, *activations)
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        num_layers, num_first, group_sizes = ctx.num_layers, ctx.num_first, ctx.group_sizes
        saved = ctx.saved_tensors
        x, saved = saved[0], saved[1:]
        first_inputs, first_matrices = saved[:num_first], saved[num_first : 2 * num_first]
        matrices = (None,) * (group_sizes is not None) + saved[2 * num_first : -num_layers]
        activations = saved[-num_layers:]
        needs = ctx.needs_input_grad  # (x, group_sizes, activate_last, W0, b0, W1, ...)
        batch, num_stacks = grad_out.shape[0], grad_out.shape[1]
        grads: list[torch.Tensor | None] = [None] * (2 * num_layers)
        grad_x = None
        # A batched layer's gradient is kept stack-major, [S, B, out] contiguous, which its two
        # batched GEMMs read fastest; a first layer of GEMMs on shared inputs reads it batch-major.
        grad = grad_out  # [B, S, out (+ 1)], any layout, read-only unless owned
        # owned: ``grad`` is a buffer of this function's, written by the layer above with this layer's
        # ReLU mask already applied (every layer below the last has a ReLU).
        owned = False
        for i in range(num_layers - 1, -1, -1):
            relu = i < num_layers - 1 or ctx.activate_last
            extend = i < num_layers - 1
            out = activations[i].shape[2] - extend  # this layer's real width
            if i == 0 and group_sizes is not None:
                if relu and not owned:
                    grad = torch.ops.aten.threshold_backward(grad, activations[0], 0)
                grad_x, grads[0], grads[1] = _grouped_first_layer_backward(
                    grad, first_inputs, first_matrices, group_sizes, ctx.input_shape, out, needs[0], needs[3] or needs[4])
                break
            stacked = grad.transpose(0, 1)
            if not owned:
                # Move into a stack-major buffer of our own, with the ReLU mask applied on the way.
                moved = torch.empty(stacked.shape, dtype=grad.dtype, device=grad.device)
                if relu:
                    torch.ops.aten.threshold_backward.grad_input(stacked, activations[i].transpose(0, 1), 0, grad_input=moved)
                else:
                    moved.copy_(stacked)
                stacked = moved
            matrix = matrices[i]
            if i == 0:  # per-stack input without a constant column
                if needs[4]:
                    grads[1] = stacked.sum(1)[:, :out]
                if needs[3]:
                    grads[0] = torch.bmm(x.transpose(0, 1).transpose(1, 2), stacked)[:, :, :out]
            elif needs[3 + 2 * i] or needs[4 + 2 * i]:
                # One GEMM: the constant column of the input gives the bias gradient as its last row.
                # MKL's bmm on any library: oneDNN would first copy the transposed slices into place,
                # which cost what it saved (W2 MMoE on a Zen 5 EPYC, performance log round 34).
                both = torch.bmm(activations[i - 1].transpose(0, 1).transpose(1, 2), stacked)[:, :, :out]
                grads[2 * i], grads[2 * i + 1] = both[:, :-1], both[:, -1]
            if i == 0 and not needs[0]:
                break
            # Batch-major [B, S, in] for the first layer's GEMMs and for this function's input, whose
            # consumers (the mixing's bmm, PLE's expert inputs) are several times slower on a strided
            # gradient; stack-major for a batched layer below.
            width = matrix.shape[1]  # the layer below's width, with its constant column when i > 0
            if i == 0 or (i == 1 and group_sizes is not None):
                below_grad = torch.empty(batch, num_stacks, width, dtype=grad.dtype, device=grad.device)
            else:
                below_grad = torch.empty(num_stacks, batch, width, dtype=grad.dtype, device=grad.device).transpose(0, 1)
            weight_rows = width - (i > 0)
            # Only the weight rows: the constant column's gradient is not the model's, it is zero. The
            # layer below's ReLU mask is applied as the product is written.
            mask = _relu_mask_into(activations[i - 1][:, :, :weight_rows].transpose(0, 1)) if i > 0 else None
            cpu_gemm.bmm_into(stacked, matrix[:, :weight_rows].transpose(1, 2), below_grad[:, :, :weight_rows].transpose(0, 1), mask)
            if i > 0:
                below_grad[:, :, weight_rows].zero_()
            if i == 0:
                grad_x = below_grad
            else:
                grad, owned = below_grad, True
        return (grad_x, None, None, *grads)


def _grouped_first_layer_backward(grad, first_inputs, first_matrices, group_sizes, input_shape, out, needs_input, needs_params):
    """Gradients of a first layer made of one GEMM per input group (see the forward).

    ``grad`` is ``[B, S, out + extend]`` with the constant column's gradient zeroed; returns the input
    gradient (``input_shape``) and the weight and bias gradients in their stored layouts.
    """
    batch, num_stacks, width = grad.shape
    shared = len(input_shape) == 2
    in_features = input_shape[-1]
    # The operand's last row is the bias, whose input column (the constant) needs no gradient; it is
    # computed anyway where that makes the input-gradient GEMM's output width a multiple of 8 (W2:
    # 272 columns take 7.3 ms, 271 take 8.8).
    aligned = (in_features + 1) % 8 == 0
    flat = grad.reshape(batch, -1)
    grad_x = grad.new_empty(input_shape) if needs_input and not (shared and aligned) else None
    grad_weight = grad_bias = None
    if needs_params and not shared:
        grad_weight = grad.new_empty(num_stacks, in_features, out)
        grad_bias = grad.new_empty(num_stacks, out)
    start = 0
    for g, size in enumerate(group_sizes):
        part = flat[:, start * width : (start + size) * width]
        if needs_params:
            onednn = shared and cpu_gemm.uses_onednn(first_inputs[g].t(), part)
            if onednn or (shared and cpu_gemm.copies_strided_operands(part)):
                # oneDNN has no call for the per-stack form below (and aten's bf16 bmm would copy its
                # expanded first operand once per stack): one GEMM over every column, the constant
                # columns then dropped in a 2.2 MB copy (W2 MMoE on an AMD EPYC: 12.3 ms against 13.7
                # for the bmm below through MKL, timed together; performance log, round 33).
                product = cpu_gemm.onednn_matmul if onednn else torch.mm
                full = product(first_inputs[g].t(), part).view(in_features + 1, size, width)
                both = full[:, :, :out].contiguous()
                grad_weight, grad_bias = both[:-1].view(in_features, -1), both[-1]
            elif shared:
                # One GEMM per stack, written straight into the parameters' [in (+ 1), S * out] layout
                # and skipping the constant columns: one mm over all columns needs its result copied
                # out (W2's first layer: the bmm as fast as that mm, and no 2.2 MB copy).
                both = grad.new_empty(in_features + 1, size, out)
                torch.bmm(first_inputs[g].t().expand(size, -1, -1), part.view(batch, size, width)[:, :, :out].transpose(0, 1),
                          out=both.transpose(0, 1))
                grad_weight, grad_bias = both[:-1].view(in_features, -1), both[-1]
            else:
                both = torch.mm(first_inputs[g].t(), part).view(in_features + 1, size, width)[:, :, :out]
                grad_weight[start : start + size] = both[:-1].transpose(0, 1)
                grad_bias[start : start + size] = both[-1]
        if needs_input:
            matrix = first_matrices[g]
            if aligned:
                product = cpu_gemm.matmul(part, matrix.t())[:, :-1]
                if shared:
                    grad_x = product
                else:
                    grad_x[:, g] = product
            else:
                cpu_gemm.matmul_into(part, matrix[:-1].t(), grad_x if shared else grad_x[:, g])
        start += size
    return grad_x, grad_weight, grad_bias


def _forward_without_grad(x: torch.Tensor, weights, biases, activate_last: bool,
                          group_sizes: tuple[int, ...] | None) -> torch.Tensor:
    """:func:`stacked_relu_mlp` when no gradient is recorded: plain GEMMs on the parameters as stored,
    then each bias added in the ReLU's pass (module docstring). Activations are stack-major
    ``(S, B, width)``, which the next layer's ``bmm`` reads as it is."""
    batch, num_layers = x.shape[0], len(weights)
    num_stacks = biases[0].shape[0]
    h = None  # stack-major (S, B, width), any strides
    for i, (weight, bias) in enumerate(zip(weights, biases)):
        relu = i < num_layers - 1 or activate_last
        # addmm / baddbmm would first copy the bias into every row of the output and then have the GEMM
        # read it back: W2's first layer (2048 x 2048) spent 0.3 ms on that on the Intel host.
        if i == 0 and x.dim() == 2:
            out = cpu_gemm.matmul(x, weight)  # [B, S * out]
            _bias_into(bias.view(-1), relu)(out, out, None)
            h = out.view(batch, num_stacks, -1).transpose(0, 1)
            continue
        out = x.new_empty(num_stacks, batch, bias.shape[1])
        if i == 0 and group_sizes is not None:
            start = 0
            for g, size in enumerate(group_sizes):
                stop = start + size
                # The group's stacks read one input: a batch of stride 0, no copy.
                cpu_gemm.bmm_into(x[:, g].expand(size, batch, x.shape[2]), weight[start:stop], out[start:stop],
                                  _bias_into(bias[start:stop].unsqueeze(1), relu))
                start = stop
        else:
            cpu_gemm.bmm_into(x.transpose(0, 1) if i == 0 else h, weight, out, _bias_into(bias.unsqueeze(1), relu))
        h = out
    return h.transpose(0, 1)


def stacked_relu_mlp(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    activate_last: bool,
    input_group_sizes: Sequence[int] | None = None,
) -> torch.Tensor:
    """``S`` ReLU MLPs of identical shape, forward and backward as one autograd node.

    Args:
        x: ``(B, in)``: one input shared by all stacks, whose first layer is one matmul; or
            ``(B, G, in)`` (any strides) with ``input_group_sizes``: the first ``n_0`` stacks read
            ``x[:, 0]``, the next ``n_1`` ``x[:, 1]``, ..., one matmul per group; or ``(B, S, in)``
            without: one input per stack, one batched matmul.
        weights: per layer, ``[in, S * out]`` for a first layer on a ``(B, in)`` input, else ``[S, in, out]``.
        biases: per layer, ``[S, out]``.
        activate_last: whether the last layer is followed by the ReLU.
        input_group_sizes: with a ``(B, G, in)`` input, how many consecutive stacks read each group.

    Returns:
        ``(B, S, out)``; a strided view of a stack-major buffer when the last layer is batched.
    """
    group_sizes = (biases[0].shape[0],) if x.dim() == 2 else (tuple(input_group_sizes) if input_group_sizes else None)
    if group_sizes is not None and sum(group_sizes) != biases[0].shape[0]:
        raise ValueError(f"input_group_sizes {group_sizes} must sum to the number of stacks ({biases[0].shape[0]})")
    if not torch.is_grad_enabled():
        return _forward_without_grad(x, weights, biases, activate_last, group_sizes)
    params: list[torch.Tensor] = []
    for weight, bias in zip(weights, biases):
        params += [weight, bias]
    return _StackedReluMLP.apply(x, group_sizes, activate_last, *params)
