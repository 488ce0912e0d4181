"""A multi-task model on tables: the feature encoder feeding any registered model."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import torch

from mtlkit.features.encoder import EncoderConfig, FeatureEncoder
from mtlkit.models.base import MultiTaskModel
from mtlkit.models.calibrated_outputs import IsotonicCalibration, OutputCalibration, apply_output_calibration
from mtlkit.models.registry import get_model_class, model_config
from mtlkit.tasks import TaskSpec

__all__ = ["TabularMultiTaskModel", "build_tabular_model"]


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
        views = backbone.input_views(backbone.config)
        if encoder.views != views:
            raise ValueError(f"encoder views {encoder.views} != the {views} input views model {backbone.registry_name!r} reads")
        super().__init__(backbone.config)
        self.registry_name = backbone.registry_name
        self.encoder = encoder
        self.backbone = backbone
        # {binary task: (scale, shift) or an isotonic map} applied to its logit after the backbone
        # (post-hoc calibration of a trained run, see set_output_calibration); None while training.
        self.output_calibration: dict[str, OutputCalibration] | None = None

    def set_output_calibration(self, calibration: Mapping[str, OutputCalibration] | None) -> None:
        """Map these binary tasks' logits from now on: ``scale * logit + shift`` for a ``(scale, shift)``
        pair (Platt scaling), or through an :class:`~mtlkit.models.IsotonicCalibration` (None: remove).
        A plain attribute, not in the state dict: a run keeps it in ``calibration.json``."""
        if calibration is None:
            self.output_calibration = None
            return
        tasks = {t.name: t for t in self.tasks}
        wrong = sorted(name for name in calibration if name not in tasks or tasks[name].type != "binary")
        if wrong:
            raise ValueError(f"output calibration: {wrong} are not binary tasks of this model ({sorted(tasks)})")
        self.output_calibration = {name: fitted if isinstance(fitted, IsotonicCalibration) else (float(fitted[0]), float(fitted[1]))
                                   for name, fitted in calibration.items()}

    def auxiliary_loss(self, outputs: Mapping[str, torch.Tensor], labels: torch.Tensor | None = None,
                       label_mask: torch.Tensor | None = None, sample_weight: torch.Tensor | None = None) -> torch.Tensor | None:
        return self.backbone.auxiliary_loss(outputs, labels, label_mask, sample_weight)

    def shared_layer_parameters(self) -> list[torch.nn.Parameter]:
        return self.backbone.shared_layer_parameters()

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        outputs = self.backbone(self.encoder(inputs))
        return outputs if self.output_calibration is None else apply_output_calibration(outputs, self.output_calibration)


def build_tabular_model(name: str, encoder_config: EncoderConfig, tasks: Sequence[TaskSpec | Mapping[str, Any] | str],
                        options: Mapping[str, Any] | None = None) -> TabularMultiTaskModel:
    """The registered model ``name`` (its config fields in ``options``) behind a feature encoder of
    ``encoder_config``'s columns, with as many embedding views as the model reads (STEM's ``K + 1``)."""
    config = model_config(name, {"input_dim": encoder_config.output_dim, "tasks": tasks, **(options or {})})
    # The encoder is built (and so initialised from the seed) before the model, as it always was.
    encoder = FeatureEncoder(dataclasses.replace(encoder_config, views=get_model_class(name).input_views(config)))
    return TabularMultiTaskModel(encoder, get_model_class(name)(config))
