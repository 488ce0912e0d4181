"""Exceptions raised for bad user input.

Both derive from ``ValueError`` so callers that already catch ``ValueError`` keep working; the
CLI turns them into a one-line message instead of a traceback.
"""

from __future__ import annotations

__all__ = ["MtlkitError", "ConfigError", "DataError", "TrainingDivergedError"]


class MtlkitError(ValueError):
    """Base class of mtlkit's user-facing errors."""


class ConfigError(MtlkitError):
    """A configuration key or value is invalid; the message names the key and the allowed values."""


class DataError(MtlkitError):
    """Input data is invalid; the message names the column (and file) and the expected form."""


class TrainingDivergedError(MtlkitError):
    """A training or validation loss became NaN or infinite; the message names the tasks and the step."""
