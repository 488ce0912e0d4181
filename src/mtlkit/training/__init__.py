"""Training: the loop, metrics, checkpoints and progress display."""

from mtlkit.training.checkpoint import load_checkpoint, save_checkpoint
from mtlkit.training.metrics import group_auc, roc_auc, task_metrics
from mtlkit.training.trainer import FitResult, StepLosses, Trainer, TrainerConfig, evaluate, forward_outputs, score_outputs

__all__ = ["Trainer", "TrainerConfig", "FitResult", "StepLosses", "evaluate", "forward_outputs", "score_outputs",
           "save_checkpoint", "load_checkpoint", "roc_auc", "group_auc", "task_metrics"]
