"""Objectives: per-task masked losses and loss weighting."""

from mtlkit.objectives.losses import TaskLosses, task_losses
from mtlkit.objectives.weighting import (
    DynamicWeighting, FixedWeighting, LossWeighting, UncertaintyWeighting,
    build_weighting, list_weightings, register_weighting,
)

__all__ = ["task_losses", "TaskLosses", "LossWeighting", "FixedWeighting", "DynamicWeighting", "UncertaintyWeighting",
           "build_weighting", "list_weightings", "register_weighting"]
