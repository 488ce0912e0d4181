"""Mixtures of small ReLU experts (one level or a stack of them: PLE, AdaTT), gates and towers as one autograd node, batch-last.

At the MMoE paper's sizes (W1 in ``benchmarks/``: 8 experts of 16 units, 2 gates, towers of 8, a
batch of 1,024) a training step is about 60 small operators and autograd nodes, each costing a
few microseconds whatever its size, so the module path spends a tenth of the step in Python glue
(module calls, per-task dicts) and another few percent in layout moves: gradients of weights read
transposed, the gates' permute, the mixing's ``bmm`` over rows of 8 floats.

Here every activation is stored features x batch, ``(stacks, width, B)``:

* all experts' first layer is one ``mm`` ``W^T x^T`` and each deeper layer one ``bmm``, the bias
  added in the ReLU's pass (``aten::_add_relu_``); all gates one ``addmm``; the softmax over a
  gate's experts a reduction over an outer dimension, vectorised along the batch (top-k and gate
  dropout mask its logits first); DSelect-k gates build their selectors' codes the same way
  (:mod:`mtlkit.models.dselect_gates`), and their penalty, with its gradient, where they have one;
* the mixing ``M[g] = sum_e P[g, e] * H[e]`` is one broadcast multiply and one sum, both along the
  batch; above PLE's first level, expert ``e`` reads mixture ``groups[e]`` of the level below (a
  gather of a few ``(D, B)`` blocks, one ``bmm``) and gate ``g`` mixture ``g``;
* the towers are ``bmm`` (hidden layers) and ``baddbmm`` (heads) on ``(K, width, B)``, and the
  heads' output ``(K, out, B)`` is the contiguous ``(K, B)`` block the losses read;
* the backward is written out: each weight gradient is one GEMM that writes the parameter's stored
  layout (``[in, S * out]`` or ``[S, in, out]``), so no gradient is transposed or copied, and the
  ReLU masks are applied in place to buffers this function owns.

It is the same maths as :class:`~mtlkit.models.ExpertBank`, :class:`~mtlkit.models.GateBank`,
``mix_experts`` and :class:`~mtlkit.models.TaskTowers` with ReLU and no norm or dropout, on the same
parameters (nothing about checkpoints changes), summed in another order;
``tests/test_small_mixture.py`` checks both paths agree, forward and every gradient. Models use it
up to :data:`SMALL_MIXTURE_MAX_ACTIVATIONS` expert activations per level and batch. A training step with
Adam against the module path (8 experts, 2 gates, towers of 8, alternating in one process, best of
9): 16 units x 1,024 rows 6-17 % faster, 16 x 4,096 and 64 x 1,024 (524,288 activations) 32-40 %
faster, 128 x 1,024 and 256 x 512 (1,048,576) 0-6 % slower, where the GEMMs dominate and the
batch-major layouts suit them (from there on the fused path, :mod:`mtlkit.models.fused_mlp`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Sequence

import torch
from torch.autograd.function import once_differentiable
from torch.nn.modules import module as _module

from mtlkit.models.fused_mlp import _add_relu_, _relu_grad_
from mtlkit.models.dselect_gates import DSelectKGateBank, _dselect_ops, dselect_weights_backward, dselect_weights_forward
from mtlkit.models.gates import GateBank, drop_choices, keep_top_k
from mtlkit.tasks import TaskOutputs

if TYPE_CHECKING:
    from mtlkit.models.experts import ExpertBank
    from mtlkit.models.towers import TaskTowers

__all__ = ["SMALL_MIXTURE_MAX_ACTIVATIONS", "MixtureLevel", "small_mixture", "small_mixture_applies", "small_mixture_outputs"]

# Expert activations (batch x experts x widest layer) up to which a mixture takes this path.
SMALL_MIXTURE_MAX_ACTIVATIONS = 1 << 19


def _layer(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, shared: bool, relu: bool = False) -> torch.Tensor:
    """One stacked linear layer, batch-last, followed by the ReLU where ``relu``.

    Shape: ``h`` ``(in, B)`` with ``weight [in, S * out]`` (a shared input) or ``(S, in, B)`` with
    ``weight [S, in, out]``; ``bias [S, out]`` ``-> (S, out, B)``.
    """
    if relu:
        # The bias joins the ReLU's pass: addmm / baddbmm would copy it into all B columns of the
        # output first and have the GEMM read them back (W1's experts: 118 us against 88 + 10).
        return _add_relu_(_product(h, weight, bias, shared), bias.unsqueeze(2))
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


class MixtureLevel(NamedTuple):
    """The parameters of one extraction level in their stored layouts (see :func:`small_mixture`)."""

    expert_weights: Sequence[torch.Tensor]
    expert_biases: Sequence[torch.Tensor]
    gate_weight: torch.Tensor
    gate_bias: torch.Tensor
    gate_mask: torch.Tensor | None = None
    expert_groups: torch.Tensor | None = None
    temperature: float = 1.0
    gate_residual: torch.Tensor | None = None
    top_k: int | None = None
    dropout: float = 0.0
    dselect: tuple | None = None
    gates_read_input: bool = True
    penalised_gates: DSelectKGateBank | None = None


class _SmallMixture(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, structure, *params):
        # per level: (expert layers, gate mask, expert groups, temperature, group sizes,
        # whether a gate residual follows the gate's parameters, top k, gate dropout, DSelect-k structure,
        # whether the gates read their input or only their task, the DSelect-k bank whose penalty is an output)
        levels, towers_shared = structure
        saved: list[torch.Tensor] = []  # per level: [its input and the experts' gathered one, above the first], expert outputs, gates
        h = x.t()  # the first level's input (in, B); above it, (G, D, B): one input per gate of the level below
        p = 0
        selector_counts = []  # per level: how many tensors its DSelect-k gates saved (0 for softmax gates)
        penalties = []  # the penalty of each DSelect-k level that has one, in level order
        for level, (num_layers, gate_mask, groups, temperature, _, has_residual, top_k, dropout, dselect, reads,
                    penalised) in enumerate(levels):
            first = level == 0
            # Experts: (E, D, B) after every layer, ReLU in place on the GEMM's own output. Above the
            # first level expert e reads input groups[e]: a gather of a few small blocks.
            out = h if first else h.index_select(0, groups)
            if not first:
                saved += [h, out]
            for i in range(num_layers):
                out = _layer(out, params[p + 2 * i], params[p + 2 * i + 1], shared=first and i == 0, relu=True)
                saved.append(out)
            gate_weight, gate_bias = params[p + 2 * num_layers], params[p + 2 * num_layers + 1]
            mixing_offset = params[p + 2 * num_layers + 2] if has_residual else None
            p += 2 * num_layers + 2 + has_residual
            bias = gate_bias if gate_mask is None else gate_bias + gate_mask
            logits = _layer(_gate_input(h, first, bias.shape[0], reads), gate_weight, bias, shared=first)
            if dselect is not None:  # (G, k (m + 1), B) selector logits -> (G, E, B) weights
                gates, codes, selector_saved = dselect_weights_forward(logits, *dselect)
                saved += [gates, *selector_saved]
                if penalised is not None:  # its value an output; its gradient, scaled by the value's, joins the codes'
                    value, codes_gradient = penalised.penalty_with_gradient(codes)
                    penalties.append(value)
                    saved.append(codes_gradient)
                selector_counts.append(len(selector_saved) + (penalised is not None))
            else:
                if temperature != 1.0:
                    logits = logits / temperature
                if dropout:
                    logits = drop_choices(logits, dropout, gate_mask)
                if top_k is not None:
                    logits = keep_top_k(logits, top_k)
                gates = torch.softmax(logits, dim=1)  # (G, E, B); 0 off a row's top k, whose backward then passes nothing
                saved.append(gates)
                selector_counts.append(0)
            mixing = gates if mixing_offset is None else gates + mixing_offset.unsqueeze(2)
            h = (mixing.unsqueeze(2) * out).sum(1)  # (G, D, B)
        # Towers: all tasks on one gate's mixture (OMoE: a shared first layer), or task k on gate k's.
        tower_inputs = [h[0] if towers_shared else h]
        num_tower_layers = (len(params) - p) // 2
        for i in range(num_tower_layers):
            out = _layer(tower_inputs[-1], params[p + 2 * i], params[p + 2 * i + 1], shared=towers_shared and i == 0,
                         relu=i < num_tower_layers - 1)
            tower_inputs.append(out)
        out = tower_inputs.pop()
        ctx.structure, ctx.num_saved, ctx.level_params, ctx.selector_counts = structure, len(saved), p, selector_counts
        ctx.save_for_backward(x, *saved, *tower_inputs, *params)
        return (out, *penalties) if penalties else out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, *grad_penalties):
        levels, towers_shared = ctx.structure
        x, *rest = ctx.saved_tensors
        saved, rest = rest[: ctx.num_saved], rest[ctx.num_saved :]
        num_params = len(ctx.needs_input_grad) - 2
        tower_inputs, params = rest[: len(rest) - num_params], rest[len(rest) - num_params :]
        needs = ctx.needs_input_grad[2:]
        grads: list[torch.Tensor | None] = [None] * num_params
        # Towers, last layer first; every layer below the head was ReLU'd in place.
        grad = grad_out
        for i in range(len(tower_inputs) - 1, -1, -1):
            p = ctx.level_params + 2 * i
            grad_h, grads[p], grads[p + 1] = _layer_backward(
                grad, tower_inputs[i], params[p], shared=towers_shared and i == 0,
                needs_input=True, needs_params=needs[p] or needs[p + 1])
            if i > 0:
                _relu_grad_(grad_h, tower_inputs[i])
            grad = grad_h
        grad_mixed = grad.unsqueeze(0) if towers_shared else grad  # (G, D, B)
        # Levels, last first: each turns the gradient of its mixture into that of its input.
        p, k = ctx.level_params, ctx.num_saved
        for level in range(len(levels) - 1, -1, -1):
            num_layers, _, groups, temperature, _, has_residual, _, _, dselect, reads, penalised = levels[level]
            first = level == 0
            p -= 2 * num_layers + 2 + has_residual
            above = 2 * (not first)  # the saved input and gathered input of a level above the first
            selector_count = ctx.selector_counts[level]
            k -= num_layers + 1 + above + selector_count
            h = x.t() if first else saved[k]
            expert_input = h if first else saved[k + 1]
            outputs = saved[k + above : k + above + num_layers]
            gates = saved[k + above + num_layers]
            experts = outputs[-1]
            # Mixing: d mixing[g, e] = <d mixed[g], experts[e]> over D; d experts[e] = sum_g mixing[g, e] d mixed[g].
            # The mixing weights are the gates' plus, with a residual, its offsets (the same for every row).
            grad_gates = (grad_mixed.unsqueeze(1) * experts).sum(2)
            mixing = gates
            if has_residual:
                r = p + 2 * num_layers + 2
                mixing = gates + params[r].unsqueeze(2)
                if needs[r]:
                    grads[r] = grad_gates.sum(2)
            grad_experts = mixing[0].unsqueeze(1) * grad_mixed[0]
            for g in range(1, mixing.shape[0]):
                grad_experts.addcmul_(mixing[g].unsqueeze(1), grad_mixed[g])
            if dselect is not None:
                start = k + above + num_layers + 1
                selector_saved, codes_grad = saved[start: start + selector_count], None
                if penalised is not None:  # the penalties' outputs in level order: this one is the last not yet taken
                    *selector_saved, codes_gradient = selector_saved
                    *grad_penalties, grad_penalty = grad_penalties
                    codes_grad = codes_gradient * grad_penalty
                grad_logits = dselect_weights_backward(selector_saved, *dselect[:3], grad_gates, codes_grad)
            else:
                grad_logits = torch._softmax_backward_data(grad_gates, gates, 1, gates.dtype)
                if temperature != 1.0:
                    grad_logits = grad_logits / temperature
            needs_input = not first or ctx.needs_input_grad[0]
            g = p + 2 * num_layers
            grad_gate_input, grads[g], grads[g + 1] = _layer_backward(
                grad_logits, _gate_input(h, first, gates.shape[0], reads), params[g], shared=first,
                needs_input=needs_input and reads, needs_params=needs[g] or needs[g + 1])
            # Experts, last layer first.
            grad = _relu_grad_(grad_experts, experts)
            for i in range(num_layers - 1, -1, -1):
                layer_input = outputs[i - 1] if i > 0 else expert_input
                grad, grads[p + 2 * i], grads[p + 2 * i + 1] = _layer_backward(
                    grad, layer_input, params[p + 2 * i], shared=first and i == 0,
                    needs_input=i > 0 or needs_input, needs_params=needs[p + 2 * i] or needs[p + 2 * i + 1])
                if i > 0:
                    _relu_grad_(grad, outputs[i - 1])
            if not needs_input:
                break
            if first:
                # (in, B) from the experts and the gates, handed back batch-major.
                return (grad if grad_gate_input is None else grad.add_(grad_gate_input)).t(), None, *grads
            # The level below's mixture: each of its outputs gets the gradients of the experts that
            # read it and of the gate that read it.
            grad_mixed = torch.zeros_like(h).index_add_(0, groups, grad)
            if grad_gate_input is not None:
                grad_mixed[: grad_gate_input.shape[0]].add_(grad_gate_input)  # `+=` on a slice also copies it onto itself
        return (None, None, *grads)


def _gate_input(h: torch.Tensor, first: bool, num_gates: int, reads: bool) -> torch.Tensor:
    """What a level's gates read: the level's input ``(in, B)`` (the first level) or each gate's own
    mixture of the level below ``(G, D, B)``, none of its features (``(0, B)``, ``(G, 0, B)``) for
    gates conditioned on the task only."""
    h = h if first else h[:num_gates]
    return h if reads else h[..., :0, :]


def _small_mixture_ops(x: torch.Tensor, structure, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """:class:`_SmallMixture`'s forward in differentiable operators, for ``torch.compile`` to trace.

    The node is opaque to inductor; these operators let it fuse each ReLU, softmax and mixing into
    the loops around the GEMMs and derive the backward itself (W1 PLE: a training step 1.4-1.5x
    faster than the node's, docs/performance-log.md, round 12). Above the first level, experts whose
    input groups come in runs read their group through ``expand`` and ``cat`` rather than a gather,
    whose backward inductor turns into a serial scatter (half a millisecond on W1 PLE).
    """
    levels, towers_shared = structure
    h, p = x.t(), 0
    penalties = []
    for level, (num_layers, gate_mask, groups, temperature, group_sizes, has_residual, top_k, dropout, dselect,
                reads, penalised) in enumerate(levels):
        first = level == 0
        if first:
            out = h
        elif group_sizes is not None:
            out = torch.cat([h[g].expand(n, *h.shape[1:]) for g, n in enumerate(group_sizes) if n])
        else:
            out = h.index_select(0, groups)
        for i in range(num_layers):
            out = torch.relu(_linear(out, params[p + 2 * i], params[p + 2 * i + 1], shared=first and i == 0))
        bias = params[p + 2 * num_layers + 1]
        if gate_mask is not None:
            bias = bias + gate_mask
        logits = _linear(_gate_input(h, first, bias.shape[0], reads), params[p + 2 * num_layers], bias, shared=first)
        if dselect is not None:
            gates, codes, _ = _dselect_ops(logits, *dselect)
            if penalised is not None:
                penalties.append(penalised.penalty_of(codes))
        else:
            if temperature != 1.0:
                logits = logits / temperature
            if dropout:
                logits = drop_choices(logits, dropout, gate_mask)
            gates = torch.softmax(logits if top_k is None else keep_top_k(logits, top_k), dim=1)
        if has_residual:
            gates = gates + params[p + 2 * num_layers + 2].unsqueeze(2)
        p += 2 * num_layers + 2 + has_residual
        h = (gates.unsqueeze(2) * out).sum(1)
    out = h[0] if towers_shared else h
    num_tower_layers = (len(params) - p) // 2
    for i in range(num_tower_layers):
        out = _linear(out, params[p + 2 * i], params[p + 2 * i + 1], shared=towers_shared and i == 0)
        if i < num_tower_layers - 1:
            out = torch.relu(out)
    return (out, *penalties) if penalties else out


def _linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, shared: bool) -> torch.Tensor:
    """:func:`_layer` without the ReLU, in differentiable operators (shapes as there). A GEMM then an
    add, not ``_layer``'s ``addmm`` / ``baddbmm``, whose broadcast bias inductor keeps as a copy: with
    them W1's compiled steps took 7 % longer (PLE 1,663 vs 1,553 us, MMoE 1,185 vs 1,104)."""
    return _product(h, weight, bias, shared) + bias.unsqueeze(2)


def _product(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, shared: bool) -> torch.Tensor:
    """A stacked linear layer's GEMM without its bias (shapes as in :func:`_layer`; ``bias`` gives
    the stacks' count and width)."""
    if shared:
        return torch.mm(weight.t(), h).view(bias.shape[0], bias.shape[1], h.shape[1])
    return torch.bmm(weight.transpose(1, 2), h)


def small_mixture(
    x: torch.Tensor,
    levels: Sequence[MixtureLevel],
    tower_weights: Sequence[torch.Tensor],
    tower_biases: Sequence[torch.Tensor],
    towers_shared: bool,
) -> torch.Tensor:
    """Extraction levels of experts, softmax gates and gated mixing, then per-task towers, as one autograd node.

    Experts and tower hidden layers are followed by a ReLU; the towers' last layer is not. The
    parameters are those of :class:`~mtlkit.models.layers.StackedLinear` in their stored layouts.

    Args:
        x: ``(B, in)``.
        levels: one :class:`MixtureLevel` per level (MMoE, OMoE, CGC: one; PLE: ``num_levels``). The
            first level's experts read ``x``: their first weight is ``[in, E * D]``, deeper ones
            ``[E, in, out]``, biases ``[E, out]``; its gates ``[in, G * E]`` and ``[G, E]``. Above it,
            expert ``e`` reads the level below's mixture ``expert_groups[e]`` (every weight
            ``[E, in, out]``) and gate ``g`` mixture ``g`` (``[G, D, E]``). ``gate_mask`` (``[G, E]``,
            optional) is added to the gate bias (``-inf`` excludes an expert from a gate);
            ``gate_residual`` (``[G, E]``, optional; AdaTT's native experts) to the gates' softmax
            weights before the mixing. ``dropout`` (training only) and ``top_k`` act on the logits
            as :class:`~mtlkit.models.GateBank`'s do, with the same random draws. ``dselect``
            (:meth:`~mtlkit.models.DSelectKGateBank.selector_structure`) makes the gates DSelect-k
            ones, whose weight ``[in, G * k (m + 1)]`` gives each gate its selectors' logits; with
            ``penalised_gates`` (the level's :class:`~mtlkit.models.DSelectKGateBank`) the node also
            returns that bank's penalty, after the towers' output. With
            ``gates_read_input`` false the gates are conditioned on the task only: their weight has
            no input rows (``[0, G * E]``), the logits are the bias.
        tower_weights, tower_biases: per tower layer ``[S, in, out]`` and ``[S, out]``; with
            ``towers_shared`` (one gate in the last level, ``G = 1``, read by every tower) the first
            is ``[D, K * out]``.

    Returns:
        ``(K, out, B)``: the towers' outputs, batch-last.
    """
    params: list[torch.Tensor] = []
    structure = []
    for level in levels:
        for weight, bias in zip(level.expert_weights, level.expert_biases):
            params += [weight, bias]
        params += [level.gate_weight, level.gate_bias]
        has_residual = level.gate_residual is not None
        if has_residual:
            params.append(level.gate_residual)
        structure.append((len(level.expert_weights), level.gate_mask, level.expert_groups, float(level.temperature), None, has_residual,
                          level.top_k, float(level.dropout), level.dselect, level.gates_read_input, level.penalised_gates))
    for weight, bias in zip(tower_weights, tower_biases):
        params += [weight, bias]
    return _SmallMixture.apply(x, (tuple(structure), towers_shared), *params)


def small_mixture_applies(x: torch.Tensor, levels: Sequence[tuple["ExpertBank", GateBank]], towers: "TaskTowers") -> bool:
    """Whether mixture levels ``[(experts, gates[, residual]), ...]`` and towers on input ``x`` can run as
    :func:`small_mixture`: a CPU batch of a shared input, not under autocast, ReLU experts and towers without norm or
    dropout, softmax gates (:class:`~mtlkit.models.GateBank` itself, top-k and gate dropout included) or DSelect-k
    gates (their penalty computed in the node), on the row or the task alone, experts small enough (see the module docstring),
    no gate recording and no forward hooks on the experts, gates or towers (their submodules' own hooks are not
    looked at: a model's ``small_mixture = False`` turns the path off)."""
    if x.dim() != 2 or x.device.type != "cpu" or not _member(towers, "net").fused or torch.is_autocast_enabled("cpu"):
        return False
    if _module._global_forward_hooks or _module._global_forward_pre_hooks or towers._forward_hooks or towers._forward_pre_hooks:
        return False
    for level, (experts, gates, *_) in enumerate(levels):
        first = level == 0
        linear = _member(gates, "linear")
        if type(gates) not in (GateBank, DSelectKGateBank):
            return False
        if (not experts.fused or (_member(experts, "input_groups") is None) != first
                or linear.shared_input != first or gates.record):
            return False
        if x.shape[0] * experts.max_activations_per_row > SMALL_MIXTURE_MAX_ACTIVATIONS:
            return False
        if any(m._forward_hooks or m._forward_pre_hooks for m in (experts, gates)):
            return False
    return True


def _member(module: torch.nn.Module, name: str):
    """``getattr(module, name)``, read from the module's own dictionaries: for a submodule, parameter
    or buffer ``getattr`` first fails its ordinary lookup and then runs ``nn.Module.__getattr__``,
    about 0.5 us each, and the node reads a few dozen of them per forward."""
    members = module.__dict__
    if name in members:
        return members[name]
    for members in (module._parameters, module._buffers, module._modules):
        if name in members:
            return members[name]
    raise AttributeError(f"{type(module).__name__!r} object has no attribute {name!r}")


def _node_arguments(levels: Sequence[tuple["ExpertBank", GateBank]], towers: "TaskTowers"):
    """The node's ``(structure, parameters)`` straight from the modules (no MixtureLevel in between;
    a level's gate residual, where it has one, follows its gate's parameters),
    read from their dictionaries (see :func:`_member`): at W1's sizes the Python around the node is
    a few percent of a training step (PLE: 19 us a forward through ``getattr``, 3.9 us this way)."""
    params: list[torch.Tensor] = []
    structure = []
    for experts, gates, *residual in levels:
        linears = experts._modules["linears"]._modules.values()
        for layer in linears:
            own = layer._parameters
            params += (own["weight"], own["bias"])
        gate_linear = gates._modules["linear"]
        params += (gate_linear._parameters["weight"], gate_linear._parameters["bias"])
        has_residual = bool(residual) and residual[0] is not None
        if has_residual:
            params.append(residual[0])
        reads = gate_linear.in_features > 0
        if type(gates) is DSelectKGateBank:  # its choices are in its codes, not in a logit mask
            penalised = gates if gates.has_penalty and gates.training and torch.is_grad_enabled() else None
            structure.append((len(linears), None, _member(experts, "input_groups"), 1.0, experts.group_sizes,
                              has_residual, None, 0.0, gates.selector_structure(), reads, penalised))
        else:
            structure.append((len(linears), _member(gates, "choice_mask"), _member(experts, "input_groups"),
                              float(gates.temperature), experts.group_sizes, has_residual, gates.top_k,
                              gates.dropout if gates.training else 0.0, None, reads, None))
    tower_linears = list(towers._modules["net"]._modules["linears"]._modules.values())
    for layer in tower_linears:
        own = layer._parameters
        params += (own["weight"], own["bias"])
    return (tuple(structure), tower_linears[0].shared_input), params


def small_mixture_outputs(x: torch.Tensor, levels: Sequence[tuple["ExpertBank", GateBank]], towers: "TaskTowers") -> TaskOutputs:
    """The model's forward through :func:`small_mixture`: levels ``[(experts, gates[, residual]), ...]``,
    each ``mix_experts(gates(h) [+ residual], experts(h))`` (``residual`` ``(G, E)`` or None), then
    ``towers`` (one gate read by every tower when the towers share their input). Under
    ``torch.compile`` the same maths as plain operators, which inductor fuses.

    Shape: ``(B, in) -> {task: (B, output_dim)}``.
    """
    structure, params = _node_arguments(levels, towers)
    if torch.compiler.is_compiling():
        out = _small_mixture_ops(x, structure, params)
    else:
        out = _SmallMixture.apply(x, structure, *params)
    if isinstance(out, tuple):  # DSelect-k penalties, which their gates leave for the model to collect
        out, *penalties = out
        penalised = [level[-1] for level in structure[0] if level[-1] is not None]
        for gates, penalty in zip(penalised, penalties):
            gates.pending_penalty = penalty
    return TaskOutputs(out.transpose(1, 2), towers.task_names, towers.output_dims)
