"""Adam for the trainer: fused, and for small models stepped over one flat buffer.

``torch.optim.Adam(fused=True)`` costs a few microseconds per parameter tensor on the CPU whatever
its size (a parallel region and a scalar read of its step counter each). A model of the MMoE paper's
synthetic size has 15,000 parameters in 8-14 tensors, so that fixed cost is most of the optimizer
step. :class:`FlatParameters` moves the parameters into one buffer (each becomes a view of it) and
gives each a gradient that is a view of a second buffer, so Adam steps a single tensor: W1 MMoE's
training step 1,692 -> 1,589 us, Shared-Bottom 758 -> 697 us (median of 6 alternations). On W2
(0.85 M parameters) it changed nothing measurable, so only models up to ``FLAT_MAX_PARAMETERS`` use it.

The update is Adam's, element by element; the vectorised kernel may round the last few elements of a
tensor differently from the per-tensor kernel (about 1 ulp, seen on one element of a 12-element bias).

The trainer steps the fused kernel directly (:func:`build_adam`'s ``step``) rather than through
``Optimizer.step``, whose generic wrapper (a profiler ``record_function``, hook chains, parameter-group
bookkeeping) took 125 us right after a W1 backward against 37 us for the same kernel call: 6 % of
the W1 MMoE training step. It is the same kernel with the same arguments, so the numbers are
identical; whenever something relies on ``Optimizer.step`` itself (a step hook, an LR scheduler
that patches it, an option the fused kernel call below does not pass) it is ``Optimizer.step``
that runs.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
from torch import nn
from torch.optim import optimizer as _optimizer_module

__all__ = ["FlatParameters", "FLAT_MAX_PARAMETERS", "TrainerAdam", "build_adam"]

# Measured: a gain at 2,000-18,000 parameters (W1), none at 850,000 (W2).
FLAT_MAX_PARAMETERS = 1 << 16


class FlatParameters:
    """``parameters`` rebased onto one contiguous buffer, their gradients onto a second one.

    After construction every parameter is a view of ``parameter`` (what the optimizer steps) and its
    ``.grad`` a view of ``parameter.grad``, which autograd accumulates into; :meth:`zero_grad` clears
    all gradients with one fill. Values are unchanged.

    Args:
        parameters: leaf parameters of one dtype and device, each listed once.
    """

    def __init__(self, parameters: Sequence[nn.Parameter]) -> None:
        parameters = list(parameters)
        total = sum(p.numel() for p in parameters)
        first = parameters[0]
        values = torch.empty(total, dtype=first.dtype, device=first.device)
        grads = torch.zeros(total, dtype=first.dtype, device=first.device)
        offset = 0
        with torch.no_grad():
            for p in parameters:
                n = p.numel()
                values[offset : offset + n].copy_(p.reshape(-1))
                p.data = values[offset : offset + n].view_as(p)
                p.grad = grads[offset : offset + n].view_as(p)
                offset += n
        self.parameter = nn.Parameter(values)
        self.parameter.grad = grads

    def zero_grad(self) -> None:
        """Zero every gradient (the views stay in place for autograd to accumulate into)."""
        self.parameter.grad.zero_()

    @staticmethod
    def suits(parameters: Sequence[nn.Parameter], weight_decay: float, device: torch.device, distributed: bool) -> bool:
        """Whether flattening pays and keeps Adam's behaviour: a small model of one dtype on the CPU,
        one process (DDP manages gradients itself), no weight decay (a parameter that got no gradient
        would otherwise decay where per-tensor Adam skips it)."""
        return (
            device.type == "cpu"
            and not distributed
            and weight_decay == 0
            and len(parameters) > 1
            and len({p.dtype for p in parameters}) == 1
            and all(p.requires_grad and p.is_leaf for p in parameters)
            and sum(p.numel() for p in parameters) <= FLAT_MAX_PARAMETERS
        )


def _adam(parameters: list, learning_rate: float, weight_decay: float) -> torch.optim.Adam:
    """Adam with the fused kernel (one kernel for all parameters), or the multi-tensor one where the
    fused kernel is unavailable; the update is the same."""
    try:
        return torch.optim.Adam(parameters, lr=learning_rate, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(parameters, lr=learning_rate, weight_decay=weight_decay, foreach=True)


def _step_hooked(optimizer: torch.optim.Optimizer) -> bool:
    """Whether anything observes or patches ``optimizer.step`` (hooks, an LR scheduler's counter)."""
    return bool(
        "step" in vars(optimizer)
        or optimizer._optimizer_step_pre_hooks
        or optimizer._optimizer_step_post_hooks
        or getattr(_optimizer_module, "_global_optimizer_pre_hooks", None)
        or getattr(_optimizer_module, "_global_optimizer_post_hooks", None)
    )


def _fused_adam_step(optimizer: torch.optim.Adam) -> bool:
    """One Adam update through the fused kernel, the call ``Adam.step`` makes for plain options
    (no amsgrad, maximize, capturable, differentiable or decoupled decay, a float learning rate,
    state already initialised); False, with nothing done, where any of that does not hold."""
    kernel = getattr(torch, "_fused_adam_", None)
    if kernel is None or _step_hooked(optimizer):
        return False
    calls = []
    for group in optimizer.param_groups:
        if (not group.get("fused") or group["amsgrad"] or group["maximize"] or group["capturable"]
                or group["differentiable"] or group.get("decoupled_weight_decay") or isinstance(group["lr"], torch.Tensor)):
            return False
        params = [p for p in group["params"] if p.grad is not None]
        states = [optimizer.state.get(p) for p in params]
        if any(not state for state in states) or any(p.grad.is_sparse for p in params):
            return False  # Adam.step initialises the state (or refuses sparse gradients)
        if len({(p.device, p.dtype) for p in params}) > 1:
            return False  # Adam.step splits such a group into one kernel call per device and dtype
        calls.append((group, params, states))
    for group, params, states in calls:
        if not params:
            continue
        steps = [state["step"] for state in states]
        beta1, beta2 = group["betas"]
        with torch.no_grad():
            torch._foreach_add_(steps, 1)
            kernel(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                   [], steps, amsgrad=False, lr=group["lr"], beta1=beta1, beta2=beta2,
                   weight_decay=group["weight_decay"], eps=group["eps"], maximize=False, grad_scale=None, found_inf=None)
    return True


class TrainerAdam(NamedTuple):
    """What :func:`build_adam` returns: the optimizer, how to clear its gradients, how to step it."""

    optimizer: torch.optim.Adam
    zero_grad: Callable[[], None]
    step: Callable[[], None]


def build_adam(parameters: Sequence[nn.Parameter], learning_rate: float, weight_decay: float,
               device: torch.device, distributed: bool = False, extra_groups: Sequence[dict] = ()) -> TrainerAdam:
    """The trainer's Adam: over one flat buffer where that suits (:meth:`FlatParameters.suits`), else
    over the parameters themselves; ``step`` calls the fused kernel directly where it can (module
    docstring), else ``optimizer.step()``. ``extra_groups``: more parameter groups with options of
    their own (``{"params": [...], "lr": ...}``), stepped per tensor."""
    parameters = list(parameters)
    if not extra_groups and FlatParameters.suits(parameters, weight_decay, device, distributed):
        flat = FlatParameters(parameters)
        optimizer = _adam([flat.parameter], learning_rate, weight_decay)
        zero_grad = flat.zero_grad
    else:
        optimizer = _adam([{"params": parameters}, *extra_groups], learning_rate, weight_decay)
        zero_grad = lambda: optimizer.zero_grad(set_to_none=True)  # noqa: E731

    def step() -> None:
        if not _fused_adam_step(optimizer):
            optimizer.step()

    return TrainerAdam(optimizer, zero_grad, step)
