"""The mean of a tensor over the replicas of a torchrun (DDP) job.

DDP averages the model's gradients alone; whatever else every replica must agree on (a weighting's
learned weights and reference losses, a gradient surgery's per-task gradients) goes through here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["mean_over_replicas"]


def mean_over_replicas(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s mean over the replicas, each passing its own of the same shape: ``tensor`` itself
    (made contiguous) averaged in place and returned; ``tensor`` unchanged outside a distributed job."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    tensor = tensor.contiguous()
    dist.all_reduce(tensor)
    return tensor.div_(dist.get_world_size())
