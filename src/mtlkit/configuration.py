"""Building validated dataclasses from plain mappings (config files, checkpoints, CLI overrides)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

from mtlkit.errors import ConfigError

__all__ = ["from_mapping", "to_plain", "check_sizes", "check_count", "check_positive"]

T = TypeVar("T")


def from_mapping(cls: type[T], data: Any, where: str) -> T:
    """``cls(**data)`` after checking that ``data`` is a mapping with only known keys and every required one.

    Errors name ``where`` (e.g. ``"training"`` or ``"schema.dense[2]"``), the offending keys and the allowed ones.
    """
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {type(data).__name__}")
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed keys: {names}")
    missing = [f.name for f in fields if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and f.name not in data]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}")
    try:
        return cls(**data)
    except TypeError as error:  # a wrong type the dataclass itself could not take
        raise ConfigError(f"{where}: {error}") from None


def to_plain(value: Any) -> Any:
    """Dataclasses, tuples and nested containers as JSON-ready dicts and lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if hasattr(value, "to_dict"):
            return value.to_dict()
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    return value


def check_sizes(value: Any, key: str, allow_empty: bool = True) -> tuple[int, ...]:
    """Validate a list of layer widths, naming ``key`` in the error."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    try:
        sizes = tuple(value)
    except TypeError:
        raise ConfigError(f"{key}: expected a list of layer widths, got {value!r}") from None
    if not allow_empty and not sizes:
        raise ConfigError(f"{key}: needs at least one layer, got an empty list")
    for size in sizes:
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ConfigError(f"{key}: every layer width must be an integer >= 1, got {list(sizes)}")
    return sizes


def check_count(value: Any, key: str, minimum: int) -> int:
    """Validate an integer count, naming ``key`` in the error."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{key}: expected an integer >= {minimum}, got {value!r}")
    return value


def check_probability(value: Any, key: str) -> float:
    """Validate a probability in [0, 1) (a dropout rate), naming ``key`` in the error."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1):
        raise ConfigError(f"{key}: expected a number in [0, 1), got {value!r}")
    return value


def check_non_negative(value: Any, key: str) -> float:
    """Validate a number >= 0 (a penalty's weight), naming ``key`` in the error."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0):
        raise ConfigError(f"{key}: expected a number >= 0, got {value!r}")
    return value


def check_positive(value: Any, key: str) -> float:
    """Validate a number > 0, naming ``key`` in the error."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
        raise ConfigError(f"{key}: expected a number > 0, got {value!r}")
    return value
