"""One registry from model name to model class and config class.

The Python API, config files and the CLI all go through :func:`build_model`.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from mtlkit.errors import ConfigError
from mtlkit.models.base import ModelConfig, MultiTaskModel

__all__ = ["register_model", "build_model", "list_models", "get_model_class", "model_config"]

_REGISTRY: dict[str, type[MultiTaskModel]] = {}
M = TypeVar("M", bound=type[MultiTaskModel])


def register_model(name: str) -> Callable[[M], M]:
    """Class decorator: register a :class:`MultiTaskModel` subclass under ``name``."""

    def decorator(cls: M) -> M:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        cls.registry_name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def list_models() -> list[str]:
    """Names of all registered models."""
    return sorted(_REGISTRY)


def get_model_class(name: str) -> type[MultiTaskModel]:
    """The model class registered as ``name``; unknown names list the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"model: unknown name {name!r}; expected one of {list_models()}") from None


def model_config(name: str, config: ModelConfig | dict[str, Any] | None = None, **overrides: Any) -> ModelConfig:
    """Resolve a model's typed config from a config object, a dict and/or keyword overrides."""
    cls = get_model_class(name).config_class
    if isinstance(config, ModelConfig):
        data = config.to_dict()
        # Fields of another model's config (e.g. num_experts when building a shared-bottom) are
        # dropped only when converting between model families, never from user dicts.
        data = {k: v for k, v in data.items() if k in cls.field_names()}
    else:
        data = dict(config or {})
    data.update(overrides)
    return cls.from_dict(data)


def build_model(name: str, config: ModelConfig | dict[str, Any] | None = None, **overrides: Any) -> MultiTaskModel:
    """Build a registered model from its typed config (or a dict / keyword arguments).

    Example::

        >>> model = build_model("mmoe", input_dim=100, tasks=["a", "b"], num_experts=8)
        >>> sorted(model(torch.zeros(4, 100)))
        ['a', 'b']
    """
    resolved = model_config(name, config, **overrides)
    return get_model_class(name)(resolved)
