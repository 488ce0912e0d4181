"""Per-task losses over each task's own labelled rows (the PLE paper's per-task sample space)."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from mtlkit.tasks import StackedDict, TaskOutputs, TaskSpec

__all__ = ["TaskLosses", "task_losses"]


class TaskLosses(StackedDict):
    """``{task: scalar loss}`` computed in one pass: each value is ``per_task[k]`` of one ``(K,)`` tensor.

    :class:`~mtlkit.objectives.FixedWeighting` sums the vector itself (one autograd node instead of
    ``K`` selections and ``K - 1`` additions). It is an ordinary dict for every other purpose.
    """

    def __init__(self, per_task: torch.Tensor, names: Sequence[str]) -> None:
        super().__init__(per_task, names, per_task.unbind())

    def vector_for(self, names: Sequence[str]) -> torch.Tensor | None:
        """The ``(K,)`` losses when its tasks are ``names`` in this order and no value was replaced; else None."""
        return self.stack_if_unchanged(names)


def _stacked_losses(outputs: Mapping[str, torch.Tensor], labels: torch.Tensor,
                    tasks: Sequence[TaskSpec]) -> TaskLosses | None:
    """Every task's mean loss in one pass over the model's stacked ``(K, B, width)`` outputs, where the
    tasks share an elementwise loss; None where they do not.

    On towers computed stack-major each task's mean is then a reduction over a contiguous row: the
    same sums, in the same order, as the task-by-task path.
    """
    if not isinstance(outputs, TaskOutputs) or labels.shape[1] != len(tasks):
        return None
    names = [t.name for t in tasks]
    stacked = outputs.stacked_for(names)
    task_type = tasks[0].task_type
    if stacked is None or not task_type.elementwise_loss or any(t.type != tasks[0].type for t in tasks):
        return None
    # Labels copied task-major too: an elementwise loss's result takes the layout of its operands.
    return TaskLosses(task_type.loss(stacked, labels.t().contiguous()).mean(dim=1), names)


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
    Where every label is present, no sample is weighted and the model returned its heads stacked
    (:class:`~mtlkit.tasks.TaskOutputs`) with one elementwise loss for all tasks, all losses are
    computed in one pass and returned as :class:`TaskLosses`; the values are the same.

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
    if all_labelled is None:
        all_labelled = bool(label_mask.all())
    all_present = all_labelled and sample_weight is None
    if all_present:
        stacked = _stacked_losses(outputs, labels, tasks)
        if stacked is not None:
            return stacked
    losses: dict[str, torch.Tensor] = {}
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
