"""Sizing models to a common parameter budget, as the MMoE paper compares them."""

from __future__ import annotations

from typing import Any

from mtlkit.errors import ConfigError
from mtlkit.models.base import ModelConfig
from mtlkit.models.registry import build_model, model_config

__all__ = ["count_model_parameters", "match_parameter_budget"]


def count_model_parameters(name: str, config: ModelConfig | dict[str, Any] | None = None, **overrides: Any) -> int:
    """Trainable parameters of the model ``name`` built from ``config``."""
    return build_model(name, config, **overrides).count_parameters()


def match_parameter_budget(
    name: str,
    config: ModelConfig | dict[str, Any],
    target: int,
    field: str,
    max_width: int = 1 << 16,
) -> ModelConfig:
    """Choose the first width of the layer-size field ``field`` so the model's size is closest to ``target``.

    Parameter counts grow monotonically with a layer's width, so a doubling then binary search finds it.
    Example: a Shared-Bottom sized to an MMoE with 8 experts of 16 units on 100 inputs gets a bottom of
    about 113 units, as in the paper.

    Returns the resolved config of ``name`` with ``field`` replaced.
    """
    base = model_config(name, config)
    if field not in base.field_names():
        raise ConfigError(f"field: {name!r} has no layer-size field {field!r}; its fields are {base.field_names()}")
    current = tuple(getattr(base, field))
    if not current:
        raise ConfigError(f"{field}: needs at least one layer to size")

    def size(width: int) -> int:
        return count_model_parameters(name, base.replace(**{field: (width,) + current[1:]}))

    # Grow the upper bound geometrically so no huge model is ever built, then bisect.
    high = max(current[0], 1)
    while size(high) < target and high < max_width:
        high = min(high * 2, max_width)
    low = 1
    while low < high:
        mid = (low + high) // 2
        if size(mid) < target:
            low = mid + 1
        else:
            high = mid
    best = min({max(low - 1, 1), low}, key=lambda w: abs(size(w) - target))
    return base.replace(**{field: (best,) + current[1:]})
