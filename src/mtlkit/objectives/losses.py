"""Per-task losses over each task's own labelled rows (the PLE paper's per-task sample space)."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from mtlkit.tasks import TaskSpec

__all__ = ["task_losses"]


def task_losses(
    outputs: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    label_mask: torch.Tensor,
    tasks: Sequence[TaskSpec],
    sample_weight: torch.Tensor | None = None,
    all_labelled: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Mean loss of each task over the rows where its label is present.

    A task with no labelled row in the batch contributes an exact 0 (with a gradient path), never NaN.
    Losses are means, not sums, so the effective learning rate does not depend on the batch size.

    Args:
        outputs: ``{task: (B, output_dim)}`` raw model outputs.
        labels: ``(B, K)`` labels in task order (NaN where missing).
        label_mask: ``(B, K)`` bool.
        tasks: task specs, in label-column order.
        sample_weight: optional ``(B,)`` weights.
        all_labelled: whether every label is present (skips the masking); None checks ``label_mask``.

    Returns:
        ``{task: scalar loss}``.
    """
    losses: dict[str, torch.Tensor] = {}
    if all_labelled is None:
        all_labelled = bool(label_mask.all())
    all_present = all_labelled and sample_weight is None
    for k, task in enumerate(tasks):
        label = labels[:, k]
        if all_present:
            losses[task.name] = task.task_type.loss(outputs[task.name], label).mean()
            continue
        mask = label_mask[:, k]
        weight = mask.float() if sample_weight is None else sample_weight * mask
        per_row = task.task_type.loss(outputs[task.name], torch.where(mask, label, torch.zeros_like(label)))
        losses[task.name] = (per_row * weight).sum() / weight.sum().clamp_min(1e-12)
    return losses
