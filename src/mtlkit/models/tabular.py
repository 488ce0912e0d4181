"""A multi-task model on tables: the feature encoder feeding any registered model."""

from __future__ import annotations

from typing import Mapping

import torch

from mtlkit.features.encoder import FeatureEncoder
from mtlkit.models.base import MultiTaskModel

__all__ = ["TabularMultiTaskModel"]


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

    def auxiliary_loss(self, outputs: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        return self.backbone.auxiliary_loss(outputs)

    def shared_layer_parameters(self) -> list[torch.nn.Parameter]:
        return self.backbone.shared_layer_parameters()

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.backbone(self.encoder(inputs))
