"""Objectives: per-task masked losses, loss weighting and gradient surgery."""

from mtlkit.objectives.gradient_surgery import (
    DualBalancing,
    GradientLayout,
    GradientVaccine,
    MetaBalance,
    MoCo,
    aligned_mtl,
    build_gradient_surgery,
    cagrad,
    fairgrad,
    get_gradient_surgery,
    gradient_surgery_options,
    imtl,
    list_gradient_surgeries,
    mgda,
    nash_mtl,
    pcgrad,
    refused_scopes,
    register_gradient_surgery,
    upgrad,
)
from mtlkit.objectives.losses import TaskLosses, task_losses
from mtlkit.objectives.weighting import (
    DynamicWeightAverage, DynamicWeighting, FastAdaptiveWeighting, FixedWeighting, GeometricLossWeighting, GradNormWeighting,
    LossWeighting, RandomLossWeighting, UncertaintyWeighting, build_weighting, get_weighting, list_weightings, register_weighting,
    weighting_options,
)

__all__ = ["task_losses", "TaskLosses", "LossWeighting", "FixedWeighting", "DynamicWeighting", "DynamicWeightAverage",
           "UncertaintyWeighting", "GradNormWeighting", "RandomLossWeighting", "FastAdaptiveWeighting",
           "GeometricLossWeighting", "build_weighting", "get_weighting", "list_weightings", "register_weighting",
           "weighting_options",
           "pcgrad", "mgda", "cagrad", "aligned_mtl", "imtl", "nash_mtl", "fairgrad", "upgrad", "GradientVaccine",
           "DualBalancing", "MetaBalance", "MoCo", "GradientLayout", "get_gradient_surgery", "build_gradient_surgery",
           "list_gradient_surgeries", "register_gradient_surgery", "gradient_surgery_options",
           "refused_scopes"]
