"""The mean of a tensor over the replicas of a torchrun (DDP) job.

DDP averages the model's gradients alone; whatever else every replica must agree on (a weighting's
learned weights and reference losses, a gradient surgery's per-task gradients) goes through here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["assign_gradient", "mean_gradients_over_replicas", "mean_over_replicas"]


def assign_gradient(parameter: torch.Tensor, gradient: torch.Tensor) -> None:
    """Write ``gradient`` into ``parameter.grad`` in place when it exists: for small models it is a view
    of the optimizer's flat gradient buffer, which a new tensor would leave behind; else a copy of it."""
    if parameter.grad is None:
        parameter.grad = gradient.clone()
    else:
        parameter.grad.copy_(gradient)


def mean_over_replicas(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s mean over the replicas, each passing its own of the same shape: ``tensor`` itself
    (made contiguous) averaged in place and returned; ``tensor`` unchanged outside a distributed job."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    tensor = tensor.contiguous()
    dist.all_reduce(tensor)
    return tensor.div_(dist.get_world_size())


def mean_gradients_over_replicas(parameters: list[torch.Tensor]) -> None:
    """Replace each parameter's gradient by its mean over the replicas, in one all-reduce, as DDP does
    for the model's: a replica without a gradient for a parameter counts zeros, and a parameter that no
    replica has a gradient for keeps none. Every replica must pass the same parameters, in the same
    order; outside a distributed job nothing changes.

    The lists of which parameters have gradients may differ between replicas (a learned weight that
    only some replicas' batches reached), so every parameter takes part, and a count of the replicas
    holding a gradient for each travels in the same all-reduce.
    """
    if not parameters or not (dist.is_available() and dist.is_initialized()):
        return
    present = [p.grad is not None for p in parameters]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in parameters]
                     + [torch.tensor(present, dtype=parameters[0].dtype, device=parameters[0].device)])
    flat = mean_over_replicas(flat)
    # Reading the counts syncs with the device: only needed where this replica lacks a gradient.
    held = present if all(present) else (flat[-len(parameters):] > 0).tolist()
    offset = 0
    for p, anywhere in zip(parameters, held):
        if anywhere:
            assign_gradient(p, flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
