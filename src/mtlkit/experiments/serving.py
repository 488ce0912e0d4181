"""A trained run as one self-contained ``torch.export`` program, for serving without mtlkit.

The program takes the encoded feature tensors a run's ``preprocessing.json`` describes (what
:meth:`~mtlkit.features.TablePreprocessor.transform` makes: ``dense`` ``(B, D)`` float32,
``categorical`` ``(B, C)`` int64, ``multi_valued`` ``(B, M, L)`` int64, each present when the schema
has that kind of column) and returns ``{task: prediction}``, with any batch size: the probability
``(B,)`` of a binary task, the value ``(B,)`` of a regression task in its label's units, the mean
amount or rate ``(B,)`` of a ``ziln`` or ``poisson`` task and its probability of a positive one
``<task>_p_positive``, the class probabilities ``(B, C)`` of a multiclass task. Loading it needs
only PyTorch::

    program = torch.export.load("model.pt2").module()
    predictions = program(inputs)
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd
import torch
from torch import nn

from mtlkit.experiments.tabular_run import load_run
from mtlkit.files import atomic_write

__all__ = ["ServingModel", "export_run"]


class ServingModel(nn.Module):
    """A run's model returning predictions, regression ones back in their labels' units.

    Args:
        model: the trained model (a :class:`~mtlkit.models.MultiTaskModel`).
        to_label_units: ``(task, predictions) -> predictions`` in the label's units
            (:meth:`~mtlkit.features.TablePreprocessor.to_label_units`).

    Input: the encoded tensors; output: ``{task: (B,) or (B, C)}`` (see the module docstring).
    """

    def __init__(self, model: nn.Module, to_label_units: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.to_label_units = to_label_units

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: self.to_label_units(name, value) for name, value in self.model.predict(inputs).items()}


@contextlib.contextmanager
def _module_path(model: nn.Module) -> Iterator[None]:
    """The models' portable module-by-module path (their CPU fast paths are autograd nodes with
    Python inside, which an exported program cannot carry)."""
    switched = [m for m in model.modules() if getattr(m, "small_mixture", False) is True]
    for module in switched:
        module.small_mixture = False
    try:
        yield
    finally:
        for module in switched:
            module.small_mixture = True


def export_run(run_dir: str | os.PathLike, out_file: str | os.PathLike) -> Path:
    """Write ``out_file`` (``.pt2``), the run's model as a ``torch.export`` program (module docstring),
    with a dynamic batch size. Written to a temporary file and renamed."""
    run = load_run(run_dir)
    serving = ServingModel(run.model, run.preprocessor.to_label_units).eval().requires_grad_(False)  # callable without no_grad
    # Traced on two rows (a batch of one would be specialised to 1) whose every cell is missing: the
    # preprocessing turns them into inputs of every kind and width the schema has.
    schema = run.preprocessor.schema
    frame = pd.DataFrame({name: [None, None] for name in schema.feature_names})
    inputs = dict(run.preprocessor.transform(frame, source="an example of missing cells", with_labels=False).tensors.inputs)
    batch = torch.export.Dim("batch", min=1)
    with _module_path(run.model), torch.no_grad():
        program = torch.export.export(serving, (inputs,), dynamic_shapes=({key: {0: batch} for key in inputs},))

    def save(tmp: str) -> None:
        with open(tmp, "wb") as file:  # a file object: the path of the temporary file does not end in .pt2
            torch.export.save(program, file)

    return atomic_write(out_file, save)
