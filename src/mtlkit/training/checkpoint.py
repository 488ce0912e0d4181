"""Checkpoints that rebuild a model without the training script and load without unpickling objects.

A checkpoint is a plain dict of strings, numbers, lists, dicts and tensors, so
``torch.load(path, weights_only=True)`` reads it. It stores the registry name, the resolved model
config and (for table models) the feature encoder's sizes, so :func:`load_checkpoint` rebuilds the
model by itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mtlkit.errors import DataError
from mtlkit.files import atomic_write
from mtlkit.features import EncoderConfig, FeatureEncoder
from mtlkit.models import MultiTaskModel, TabularMultiTaskModel, build_model

__all__ = ["CHECKPOINT_FORMAT", "TRAINING_STATE_FORMAT", "save_checkpoint", "load_checkpoint", "save_training_state",
           "load_training_state"]

CHECKPOINT_FORMAT = "mtlkit-checkpoint/1"
TRAINING_STATE_FORMAT = "mtlkit-training-state/1"


def save_checkpoint(path: str | os.PathLike, model: MultiTaskModel, metadata: dict[str, Any] | None = None,
                    extra_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` (name, config, weights) plus JSON-like ``metadata`` and tensors ``extra_state``."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    encoder = getattr(model, "encoder", None)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_name": model.registry_name,
        "model_config": model.config.to_dict(),
        "encoder_config": encoder.config.to_dict() if encoder is not None else None,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metadata": metadata or {},
        "extra_state": extra_state or {},
    }
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[MultiTaskModel, dict[str, Any]]:
    """Rebuild the model stored at ``path``; returns ``(model, payload)``. Uses ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint: no file at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # a corrupt or foreign file
        raise DataError(f"checkpoint {path}: not a readable mtlkit checkpoint ({error})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"checkpoint {path}: expected format {CHECKPOINT_FORMAT!r}")
    model = build_model(payload["model_name"], payload["model_config"])
    if payload.get("encoder_config"):
        model = TabularMultiTaskModel(FeatureEncoder(EncoderConfig.from_dict(payload["encoder_config"])), model)
    model.load_state_dict(payload["state_dict"])
    return model, payload


def save_training_state(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Atomically write the state of an unfinished training run (plain containers and tensors only),
    for :meth:`~mtlkit.training.Trainer.fit` to resume from."""
    return atomic_write(path, lambda tmp: torch.save({"format": TRAINING_STATE_FORMAT, **state}, tmp))


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a file written by :func:`save_training_state` (``weights_only=True``: nothing is unpickled)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file
        raise DataError(f"training state {path}: not readable ({error})") from None
    if not isinstance(state, dict) or state.get("format") != TRAINING_STATE_FORMAT:
        raise DataError(f"training state {path}: expected format {TRAINING_STATE_FORMAT!r}")
    return state
