"""Typed model configurations and the common base class of all multi-task models."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from mtlkit.configuration import check_count, check_probability, check_sizes, from_mapping
from mtlkit.errors import ConfigError
from mtlkit.models.gates import GateBank
from mtlkit.models.layers import ACTIVATIONS, NORMS
from mtlkit.tasks import TaskSpec, validate_tasks

__all__ = ["ModelConfig", "MultiTaskModel"]


@dataclass
class ModelConfig:
    """Fields every model shares.

    Args:
        input_dim: width of the input vector ``x`` (for tables: the feature encoder's output width).
        tasks: the tasks, as :class:`TaskSpec`, dicts or plain names (binary by default).
        tower_hidden: hidden widths of each task's tower (the output head is added after them).
        activation: hidden activation (see ``mtlkit.models.layers.ACTIVATIONS``).
        dropout: dropout after hidden activations, in [0, 1).
        norm: ``None``, ``"batch"`` or ``"layer"`` normalisation in hidden layers.
    """

    input_dim: int
    tasks: Sequence[TaskSpec]
    tower_hidden: Sequence[int] = (8,)
    activation: str = "relu"
    dropout: float = 0.0
    norm: str | None = None

    def __post_init__(self) -> None:
        check_count(self.input_dim, "input_dim", 1)
        self.tasks = validate_tasks(self.tasks)
        self.tower_hidden = check_sizes(self.tower_hidden, "tower_hidden")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation: unknown {self.activation!r}; expected one of {sorted(ACTIVATIONS)}")
        check_probability(self.dropout, "dropout")
        if self.norm not in NORMS:
            raise ConfigError(f"norm: unknown {self.norm!r}; expected one of {list(NORMS)}")

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Build from plain data; an unknown key is an error naming it and the allowed keys."""
        return from_mapping(cls, data, cls.__name__)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (tasks as dicts, tuples as lists); ``from_dict`` inverts it."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "tasks":
                value = [t.to_dict() for t in value]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    def replace(self, **changes: Any) -> "ModelConfig":
        """A validated copy with some fields changed."""
        return type(self).from_dict({**self.to_dict(), **changes})


class MultiTaskModel(nn.Module):
    """Base class: ``model(x) -> {task_name: raw output (B, output_dim)}``.

    Subclasses are registered with :func:`mtlkit.models.register_model` and built from their typed
    config by :func:`mtlkit.models.build_model`. Outputs are logits (binary) or values (regression);
    probabilities only come from :meth:`predict`.
    """

    registry_name: str = ""
    config_class: type[ModelConfig] = ModelConfig
    # False for models whose tasks are fixed roles (ESMM: ctr, cvr, ctcvr) rather than any K >= 1.
    any_number_of_tasks: bool = True
    # The task types a model accepts (None: any); the entire-space funnel multiplies probabilities.
    task_types: tuple[str, ...] | None = None

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tasks: tuple[TaskSpec, ...] = tuple(config.tasks)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @classmethod
    def input_views(cls, config: ModelConfig) -> int:
        """How many copies of its input features the model with ``config`` reads per row: 1, or
        ``K + 1`` for STEM (each task's, then the shared one), which a table's feature encoder then
        embeds separately."""
        return 1

    def count_parameters(self, trainable_only: bool = True) -> int:
        """Number of (trainable) parameters, leaving out gate entries a gate can never choose (PLE's
        gates are dense over a level's experts, see :class:`~mtlkit.models.GateBank`)."""
        total = sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
        excluded = sum(bank.num_excluded_parameters() for bank in self.gate_banks().values()
                       if bank.linear.weight.requires_grad or not trainable_only)
        return total - excluded

    @torch.no_grad()
    def predict(self, x: Any) -> dict[str, torch.Tensor]:
        """Predictions per task (probabilities for binary tasks), in eval mode, each followed by the
        task type's side predictions as ``<task>_<name>`` (``spend_p_positive`` for ``ziln`` and ``poisson`` tasks)."""
        was_training = self.training
        self.eval()
        try:
            outputs = self(x)
            predictions = {}
            for task in self.tasks:
                output = outputs[task.name]
                predictions[task.name] = task.task_type.predict(output)
                for suffix, side in task.task_type.side_predictions.items():
                    predictions[f"{task.name}_{suffix}"] = side(output)
            return predictions
        finally:
            self.train(was_training)

    def auxiliary_loss(self, outputs: Mapping[str, torch.Tensor], labels: torch.Tensor | None = None,
                       label_mask: torch.Tensor | None = None, sample_weight: torch.Tensor | None = None) -> torch.Tensor | None:
        """A term the trainer adds to the weighted task losses, computed from the training forward's
        ``outputs`` and the batch's ``labels`` and ``label_mask`` (``(B, K)`` in task order) and
        ``sample_weight`` (``(B,)`` or None): a scalar (AITM's calibrator, ESCM2's counterfactual
        risk), or None (no such term). Loss weightings never scale it, and validation losses leave it
        out. The default is :meth:`gate_penalty`."""
        return self.gate_penalty()

    def gate_penalty(self) -> torch.Tensor | None:
        """The sum of the regularisation terms the gates left in the last training forward
        (DSelect-k's), or None where no gate has one. The gates are looked up on the first call."""
        banks = self.__dict__.get("_penalised_gate_banks")
        if banks is None:
            # A plain attribute, not a submodule list: these banks are registered where they are.
            banks = self.__dict__["_penalised_gate_banks"] = tuple(
                bank for bank in self.gate_banks().values() if bank.has_penalty)
        penalties = [p for p in (bank.take_penalty() for bank in banks) if p is not None]
        return sum(penalties[1:], penalties[0]) if penalties else None

    def shared_layer_parameters(self) -> list[nn.Parameter]:
        """The parameters of the last layer that every task's output depends on (GradNorm balances
        the tasks' gradient norms there); a :class:`ConfigError` for models without one."""
        raise ConfigError(f"model {self.registry_name!r} has no layer that every task shares; GradNorm needs one "
                          "(shared_bottom, omoe, mmoe, cgc, ple, adatt, stem)")

    def gate_banks(self) -> dict[str, GateBank]:
        """All gate banks of the model, by module path."""
        return {name: m for name, m in self.named_modules() if isinstance(m, GateBank)}

    @contextlib.contextmanager
    def recording_gates(self) -> Iterator[dict[str, torch.Tensor]]:
        """Context manager: gate weights of every forward inside it are kept.

        Yields a dict that is filled on exit with ``{gate path: weights (B, G, E)}`` of the last forward.
        """
        banks = self.gate_banks()
        result: dict[str, torch.Tensor] = {}
        for bank in banks.values():
            bank.record = True
        try:
            yield result
        finally:
            for name, bank in banks.items():
                bank.record = False
                if bank.last_weights is not None:
                    result[name] = bank.last_weights
                bank.last_weights = None

    def extra_repr(self) -> str:
        return f"tasks={self.task_names}"
