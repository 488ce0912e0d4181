"""mtlkit: multi-task learning with mixtures of experts for ranking and recommendation."""

from mtlkit.errors import ConfigError, DataError, MtlkitError, TrainingDivergedError
from mtlkit.models import build_model, list_models
from mtlkit.tasks import TaskSpec

__version__ = "0.1.0"

__all__ = ["TaskSpec", "build_model", "list_models", "ConfigError", "DataError", "MtlkitError", "TrainingDivergedError",
           "__version__"]
