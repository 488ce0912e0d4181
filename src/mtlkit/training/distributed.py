"""Multi-process training through PyTorch's own engine (``torchrun`` + DistributedDataParallel).

``torchrun --nproc_per_node N -m mtlkit.cli train --config run.yaml`` starts N processes; each calls
:func:`init_distributed`, which reads torchrun's environment and joins the process group (NCCL on
GPUs, Gloo on CPUs). The :class:`~mtlkit.training.Trainer` then wraps the model in DDP, gives each
rank its shard of every epoch, and lets only rank 0 draw progress and write files.

NCCL needs one GPU per process of a machine; with fewer GPUs than local processes (two ranks
sharing one GPU, say, to try a job out) the group uses Gloo, which also reduces CUDA tensors.
``MTLKIT_DISTRIBUTED_BACKEND`` (``nccl`` or ``gloo``) overrides the choice.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from mtlkit.errors import ConfigError

__all__ = ["init_distributed", "is_main_process", "barrier"]


def init_distributed() -> bool:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1); returns whether distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        backend = os.environ.get("MTLKIT_DISTRIBUTED_BACKEND") or _default_backend()
        if backend not in ("nccl", "gloo"):
            raise ConfigError(f"MTLKIT_DISTRIBUTED_BACKEND: expected 'nccl' or 'gloo', got {backend!r}")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group(backend=backend)
    return True


def _default_backend() -> str:
    """NCCL where every local process has a GPU of its own, else Gloo."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= local_processes else "gloo"


def is_main_process() -> bool:
    """True on rank 0, and always when not distributed."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
