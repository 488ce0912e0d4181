"""A multi-task model on tables: the feature encoder feeding any registered model."""

from __future__ import annotations

from typing import Mapping

import torch

from mtlkit.features.encoder import FeatureEncoder
from mtlkit.models.base import MultiTaskModel

__all__ = ["TabularMultiTaskModel", "apply_output_calibration"]


def apply_output_calibration(outputs: Mapping[str, torch.Tensor],
                             calibration: Mapping[str, tuple[float, float]]) -> dict[str, torch.Tensor]:
    """``outputs`` with ``logit -> scale * logit + shift`` for each task in ``calibration`` (Platt
    scaling, :mod:`mtlkit.training.output_calibration`); other tasks unchanged."""
    return {name: value * calibration[name][0] + calibration[name][1] if name in calibration else value
            for name, value in outputs.items()}


class TabularMultiTaskModel(MultiTaskModel):
    """``backbone(encoder(inputs))``: embeddings plus dense features into MMoE, PLE, ESMM, ...

    The encoder's output width must equal the backbone's ``input_dim``. ``config``, ``tasks`` and
    ``registry_name`` are the backbone's, so reports and checkpoints name the real model.

    Input: the dict of tensors a :class:`~mtlkit.features.TablePreprocessor` produces.
    Output: ``{task: (B, output_dim)}``.
    """

    def __init__(self, encoder: FeatureEncoder, backbone: MultiTaskModel) -> None:
        if encoder.output_dim != backbone.config.input_dim:
            raise ValueError(f"encoder output width {encoder.output_dim} != model input_dim {backbone.config.input_dim}")
        super().__init__(backbone.config)
        self.registry_name = backbone.registry_name
        self.encoder = encoder
        self.backbone = backbone
        # {binary task: (scale, shift)} applied to its logit after the backbone (post-hoc Platt scaling
        # of a trained run, see set_output_calibration); None while training.
        self.output_calibration: dict[str, tuple[float, float]] | None = None

    def set_output_calibration(self, calibration: Mapping[str, tuple[float, float]] | None) -> None:
        """Apply ``logit -> scale * logit + shift`` to these binary tasks' outputs from now on (None:
        remove). A plain attribute, not in the state dict: a run keeps it in ``calibration.json``."""
        if calibration is None:
            self.output_calibration = None
            return
        tasks = {t.name: t for t in self.tasks}
        wrong = sorted(name for name in calibration if name not in tasks or tasks[name].type != "binary")
        if wrong:
            raise ValueError(f"output calibration: {wrong} are not binary tasks of this model ({sorted(tasks)})")
        self.output_calibration = {name: (float(a), float(b)) for name, (a, b) in calibration.items()}

    def auxiliary_loss(self, outputs: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        return self.backbone.auxiliary_loss(outputs)

    def shared_layer_parameters(self) -> list[torch.nn.Parameter]:
        return self.backbone.shared_layer_parameters()

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        outputs = self.backbone(self.encoder(inputs))
        return outputs if self.output_calibration is None else apply_output_calibration(outputs, self.output_calibration)
