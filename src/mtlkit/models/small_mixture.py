"""A one-level mixture of small ReLU experts, its gates and its towers as one autograd node, batch-last.

At the MMoE paper's sizes (W1 in ``benchmarks/``: 8 experts of 16 units, 2 gates, towers of 8, a
batch of 1,024) a training step is about 60 small operators and autograd nodes, each costing a
few microseconds whatever its size, so the module path spends a tenth of the step in Python glue
(module calls, per-task dicts) and another few percent in layout moves: gradients of weights read
transposed, the gates' permute, the mixing's ``bmm`` over rows of 8 floats.

Here every activation is stored features x batch, ``(stacks, width, B)``:

* all experts' first layer is one ``addmm`` ``W^T x^T`` and each deeper layer one ``baddbmm``; all
  gates one ``addmm``; the softmax over a gate's experts a reduction over an outer dimension,
  vectorised along the batch;
* the mixing ``M[g] = sum_e P[g, e] * H[e]`` is one broadcast multiply and one sum, both along the
  batch;
* the towers are ``baddbmm`` on ``(K, width, B)``, and the heads' output ``(K, out, B)`` is the
  contiguous ``(K, B)`` block the losses read;
* the backward is written out: each weight gradient is one GEMM that writes the parameter's stored
  layout (``[in, S * out]`` or ``[S, in, out]``), so no gradient is transposed or copied, and the
  ReLU masks are applied in place to buffers this function owns.

It is the same maths as :class:`~mtlkit.models.ExpertBank`, :class:`~mtlkit.models.GateBank`,
``mix_experts`` and :class:`~mtlkit.models.TaskTowers` with ReLU and no norm or dropout, on the same
parameters (nothing about checkpoints changes), summed in another order;
``tests/test_small_mixture.py`` checks both paths agree, forward and every gradient. Models use it
up to :data:`SMALL_MIXTURE_MAX_ACTIVATIONS` expert activations per batch. A training step with
Adam against the module path (8 experts, 2 gates, towers of 8, alternating in one process, best of
9): 16 units x 1,024 rows 6-17 % faster, 16 x 4,096 and 64 x 1,024 (524,288 activations) 32-40 %
faster, 128 x 1,024 and 256 x 512 (1,048,576) 0-6 % slower, where the GEMMs dominate and the
batch-major layouts suit them (from there on the fused path, :mod:`mtlkit.models.fused_mlp`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch.autograd.function import once_differentiable
from torch.nn.modules import module as _module

from mtlkit.tasks import TaskOutputs

if TYPE_CHECKING:
    from mtlkit.models.experts import ExpertBank
    from mtlkit.models.gates import GateBank
    from mtlkit.models.towers import TaskTowers

__all__ = ["SMALL_MIXTURE_MAX_ACTIVATIONS", "small_mixture", "small_mixture_applies", "small_mixture_outputs"]

# Expert activations (batch x experts x widest layer) up to which a mixture takes this path.
SMALL_MIXTURE_MAX_ACTIVATIONS = 1 << 19


def _relu_grad_(grad: torch.Tensor, activated: torch.Tensor) -> torch.Tensor:
    """``grad * (activated > 0)`` written into ``grad``."""
    return torch.ops.aten.threshold_backward.grad_input(grad, activated, 0, grad_input=grad)


def _layer(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, shared: bool) -> torch.Tensor:
    """One stacked linear layer, batch-last.

    Shape: ``h`` ``(in, B)`` with ``weight [in, S * out]`` (a shared input) or ``(S, in, B)`` with
    ``weight [S, in, out]``; ``bias [S, out]`` ``-> (S, out, B)``.
    """
    if shared:
        return torch.addmm(bias.view(-1, 1), weight.t(), h).view(bias.shape[0], bias.shape[1], h.shape[1])
    return torch.baddbmm(bias.unsqueeze(2), weight.transpose(1, 2), h)


def _layer_backward(grad: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, shared: bool,
                    needs_input: bool, needs_params: bool):
    """Gradients of :func:`_layer` for ``grad`` ``(S, out, B)``: input, weight and bias, the last two
    in their stored layouts."""
    grad_h = grad_weight = grad_bias = None
    if shared:
        flat = grad.reshape(-1, grad.shape[2])
        if needs_params:
            grad_weight = torch.mm(h, flat.t())
            grad_bias = flat.sum(1).view(grad.shape[0], grad.shape[1])
        if needs_input:
            grad_h = torch.mm(weight, flat)
    else:
        if needs_params:
            grad_weight = torch.bmm(h, grad.transpose(1, 2))
            grad_bias = grad.sum(2)
        if needs_input:
            grad_h = torch.bmm(weight, grad)
    return grad_h, grad_weight, grad_bias


class _SmallMixture(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, num_expert_layers, towers_shared, temperature, gate_mask, *params):
        expert_params = params[: 2 * num_expert_layers]
        gate_weight, gate_bias = params[2 * num_expert_layers : 2 * num_expert_layers + 2]
        tower_params = params[2 * num_expert_layers + 2 :]
        xt = x.t()
        # Experts: (E, D, B) after every layer, ReLU in place on the GEMM's own output.
        expert_outputs = []
        h = xt
        for i in range(num_expert_layers):
            h = _layer(h, expert_params[2 * i], expert_params[2 * i + 1], shared=i == 0).relu_()
            expert_outputs.append(h)
        num_experts = h.shape[0]
        bias = gate_bias if gate_mask is None else gate_bias + gate_mask
        logits = torch.addmm(bias.view(-1, 1), gate_weight.t(), xt).view(-1, num_experts, x.shape[0])
        if temperature != 1.0:
            logits = logits / temperature
        gates = torch.softmax(logits, dim=1)  # (G, E, B)
        mixed = (gates.unsqueeze(2) * h).sum(1)  # (G, D, B)
        # Towers: all tasks on one gate's mixture (OMoE: a shared first layer), or task k on gate k's.
        tower_inputs = [mixed[0] if towers_shared else mixed]
        num_tower_layers = len(tower_params) // 2
        for i in range(num_tower_layers):
            h = _layer(tower_inputs[-1], tower_params[2 * i], tower_params[2 * i + 1], shared=towers_shared and i == 0)
            if i < num_tower_layers - 1:
                h.relu_()
            tower_inputs.append(h)
        out = tower_inputs.pop()
        ctx.num_expert_layers, ctx.towers_shared, ctx.temperature = num_expert_layers, towers_shared, temperature
        ctx.save_for_backward(x, gates, *expert_outputs, *tower_inputs, *params)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        num_expert_layers, towers_shared = ctx.num_expert_layers, ctx.towers_shared
        x, gates, *saved = ctx.saved_tensors
        expert_outputs, saved = saved[:num_expert_layers], saved[num_expert_layers:]
        num_params = len(ctx.needs_input_grad) - 5
        tower_inputs, params = saved[: len(saved) - num_params], saved[len(saved) - num_params :]
        needs = ctx.needs_input_grad[5:]
        num_tower_layers = len(tower_inputs)
        grads: list[torch.Tensor | None] = [None] * num_params
        first_tower = 2 * num_expert_layers + 2
        # Towers, last layer first; every layer below the head was ReLU'd in place.
        grad = grad_out
        for i in range(num_tower_layers - 1, -1, -1):
            p = first_tower + 2 * i
            grad_h, grads[p], grads[p + 1] = _layer_backward(
                grad, tower_inputs[i], params[p], shared=towers_shared and i == 0,
                needs_input=True, needs_params=needs[p] or needs[p + 1])
            if i > 0:
                _relu_grad_(grad_h, tower_inputs[i])
            grad = grad_h
        grad_mixed = grad.unsqueeze(0) if towers_shared else grad  # (G, D, B)
        experts = expert_outputs[-1]
        # Mixing: d gates[g, e] = <d mixed[g], experts[e]> over D; d experts[e] = sum_g gates[g, e] d mixed[g].
        grad_gates = (grad_mixed.unsqueeze(1) * experts).sum(2)
        grad_experts = gates[0].unsqueeze(1) * grad_mixed[0]
        for g in range(1, gates.shape[0]):
            grad_experts.addcmul_(gates[g].unsqueeze(1), grad_mixed[g])
        grad_logits = torch._softmax_backward_data(grad_gates, gates, 1, gates.dtype)
        if ctx.temperature != 1.0:
            grad_logits = grad_logits / ctx.temperature
        flat_logits = grad_logits.view(-1, x.shape[0])
        p = 2 * num_expert_layers
        xt = x.t()
        needs_x = ctx.needs_input_grad[0]
        if needs[p] or needs[p + 1]:
            grads[p] = torch.mm(xt, flat_logits.t())
            grads[p + 1] = flat_logits.sum(1).view_as(params[p + 1])
        # Experts, last layer first.
        grad = _relu_grad_(grad_experts, experts)
        grad_x = None
        for i in range(num_expert_layers - 1, -1, -1):
            below = xt if i == 0 else expert_outputs[i - 1]
            grad_h, grads[2 * i], grads[2 * i + 1] = _layer_backward(
                grad, below, params[2 * i], shared=i == 0, needs_input=i > 0 or needs_x,
                needs_params=needs[2 * i] or needs[2 * i + 1])
            if i > 0:
                grad = _relu_grad_(grad_h, expert_outputs[i - 1])
            else:
                grad_x = grad_h
        if needs_x:
            # (in, B) from both the experts and the gates, handed back batch-major.
            grad_x = torch.addmm(grad_x, params[p], flat_logits).t()
        return (grad_x, None, None, None, None, *grads)


def small_mixture(
    x: torch.Tensor,
    expert_weights: Sequence[torch.Tensor],
    expert_biases: Sequence[torch.Tensor],
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor,
    tower_weights: Sequence[torch.Tensor],
    tower_biases: Sequence[torch.Tensor],
    towers_shared: bool,
    temperature: float = 1.0,
    gate_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Experts, softmax gates, gated mixing and per-task towers on a shared input, as one autograd node.

    Experts and tower hidden layers are followed by a ReLU; the towers' last layer is not. The
    parameters are those of :class:`~mtlkit.models.layers.StackedLinear` in their stored layouts.

    Args:
        x: ``(B, in)``.
        expert_weights, expert_biases: per expert layer ``[in, E * D]`` (the first) or ``[E, in, out]``,
            and ``[E, out]``.
        gate_weight, gate_bias: ``[in, G * E]`` and ``[G, E]``.
        tower_weights, tower_biases: per tower layer ``[S, in, out]`` and ``[S, out]``; with
            ``towers_shared`` (one gate, ``G = 1``, read by every tower) the first is ``[D, K * out]``.
        temperature: the gates' softmax temperature.
        gate_mask: optional ``[G, E]`` added to the gate bias (``-inf`` excludes an expert from a gate).

    Returns:
        ``(K, out, B)``: the towers' outputs, batch-last.
    """
    params: list[torch.Tensor] = []
    for weight, bias in zip(expert_weights, expert_biases):
        params += [weight, bias]
    params += [gate_weight, gate_bias]
    for weight, bias in zip(tower_weights, tower_biases):
        params += [weight, bias]
    return _SmallMixture.apply(x, len(expert_weights), towers_shared, float(temperature), gate_mask, *params)


def small_mixture_applies(x: torch.Tensor, experts: "ExpertBank", gates: "GateBank", towers: "TaskTowers") -> bool:
    """Whether a one-level mixture on input ``x`` can run as :func:`small_mixture`: a CPU batch of a
    shared input, ReLU experts and towers without norm or dropout, experts small enough (see the
    module docstring), no gate recording and no forward hooks on the three modules (their
    submodules' own hooks are not looked at: a model's ``small_mixture = False`` turns the path off)."""
    return (x.dim() == 2 and x.device.type == "cpu" and experts.fused and towers.net.fused
            and experts.input_groups is None and gates.linear.shared_input and not gates.record
            and x.shape[0] * experts.max_activations_per_row <= SMALL_MIXTURE_MAX_ACTIVATIONS
            and not (_module._global_forward_hooks or _module._global_forward_pre_hooks)
            and not any(m._forward_hooks or m._forward_pre_hooks for m in (experts, gates, towers)))


def small_mixture_outputs(x: torch.Tensor, experts: "ExpertBank", gates: "GateBank", towers: "TaskTowers") -> TaskOutputs:
    """``towers(mix_experts(gates(x), experts(x)))`` through :func:`small_mixture` (one gate read by
    every tower when the towers share their input).

    Shape: ``(B, in) -> {task: (B, output_dim)}``.
    """
    out = small_mixture(
        x, [layer.weight for layer in experts.linears], [layer.bias for layer in experts.linears],
        gates.linear.weight, gates.linear.bias,
        [layer.weight for layer in towers.net.linears], [layer.bias for layer in towers.net.linears],
        towers_shared=towers.net.linears[0].shared_input, temperature=gates.temperature, gate_mask=gates.choice_mask)
    return TaskOutputs(out.transpose(1, 2), towers.task_names, towers.output_dims)
