"""Multi-process training through PyTorch's own engine (``torchrun`` + DistributedDataParallel).

``torchrun --nproc_per_node N -m mtlkit.cli train --config run.yaml`` starts N processes; each calls
:func:`init_distributed`, which reads torchrun's environment and joins the process group (NCCL on
GPUs, Gloo on CPUs). The :class:`~mtlkit.training.Trainer` then wraps the model in DDP, gives each
rank its shard of every epoch, and lets only rank 0 draw progress and write files.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "is_main_process", "barrier"]


def init_distributed() -> bool:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1); returns whether distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return True


def is_main_process() -> bool:
    """True on rank 0, and always when not distributed."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
