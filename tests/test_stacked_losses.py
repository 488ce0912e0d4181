"""Losses of all tasks in one pass over the towers' stacked output, against the task-by-task path."""

import pytest
import torch

from mtlkit import TaskSpec
from mtlkit.models import build_model
from mtlkit.objectives import FixedWeighting, TaskLosses, task_losses
from mtlkit.tasks import TaskOutputs


def model_and_batch(model_name, task_type, num_tasks=3, rows=64, seed=0):
    torch.manual_seed(seed)
    tasks = [TaskSpec(f"t{k}", task_type) for k in range(num_tasks)]
    model = build_model(model_name, input_dim=7, tasks=tasks).double()
    x = torch.randn(rows, 7, dtype=torch.float64)
    labels = torch.randn(rows, num_tasks, dtype=torch.float64)
    if task_type == "binary":
        labels = (labels > 0).double()
    return model, tasks, x, labels


def loss_and_grads(model, tasks, x, labels, as_plain_dict):
    model.zero_grad()
    outputs = model(x)
    if as_plain_dict:
        outputs = dict(outputs)
    losses = task_losses(outputs, labels, torch.ones_like(labels, dtype=torch.bool), tasks, all_labelled=True)
    total, _ = FixedWeighting(tasks)(losses)
    total.backward()
    return losses, total, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("model_name", ["mmoe", "shared_bottom", "ple", "omoe"])
@pytest.mark.parametrize("task_type", ["regression", "binary"])
def test_stacked_losses_equal_the_task_by_task_path(model_name, task_type):
    model, tasks, x, labels = model_and_batch(model_name, task_type)
    stacked, total, grads = loss_and_grads(model, tasks, x, labels, as_plain_dict=False)
    per_task, reference_total, reference_grads = loss_and_grads(model, tasks, x, labels, as_plain_dict=True)
    assert isinstance(stacked, TaskLosses) and not isinstance(per_task, TaskLosses)
    for task in tasks:  # the same sums in the same order: equal, not just close
        assert torch.equal(stacked[task.name], per_task[task.name])
    assert torch.allclose(total, reference_total, rtol=1e-14, atol=0)
    for name, grad in grads.items():
        assert torch.allclose(grad, reference_grads[name], rtol=1e-12, atol=1e-15), name


def test_towers_return_their_stack_and_each_task_a_slice_of_it():
    model, tasks, x, _ = model_and_batch("mmoe", "regression")
    outputs = model(x)
    stack = outputs.stacked_for([t.name for t in tasks])
    assert stack.shape == (3, 64, 1)
    for k, task in enumerate(tasks):
        assert torch.equal(outputs[task.name], stack[k])
    assert outputs.stacked_for(["t1", "t0", "t2"]) is None  # another task order: no stack


def test_a_replaced_output_is_scored_as_replaced():
    model, tasks, x, labels = model_and_batch("mmoe", "regression")
    outputs = model(x)
    outputs["t1"] = torch.zeros(64, 1, dtype=torch.float64)
    assert outputs.stacked_for([t.name for t in tasks]) is None
    losses = task_losses(outputs, labels, torch.ones_like(labels, dtype=torch.bool), tasks, all_labelled=True)
    assert torch.allclose(losses["t1"], (labels[:, 1] ** 2).mean())


def test_mixed_task_types_padded_heads_and_missing_labels_take_the_task_by_task_path():
    stack = torch.randn(2, 5, 2)
    mixed = [TaskSpec("a", "binary"), TaskSpec("b", "regression")]
    labels = torch.tensor([[0.0, 1.5]] * 5)
    mask = torch.ones(5, 2, dtype=torch.bool)
    losses = task_losses(TaskOutputs(stack[..., :1], ["a", "b"], [1, 1]), labels, mask, mixed, all_labelled=True)
    assert not isinstance(losses, TaskLosses)
    assert torch.allclose(losses["b"], ((stack[1, :, 0] - 1.5) ** 2).mean())
    # A head narrower than the stack (padded to the widest head) is a slice, not the stack.
    padded = TaskOutputs(stack, ["a", "b"], [1, 2])
    assert padded.stacked_for(["a", "b"]) is None and padded["a"].shape == (5, 1)
    same_type = [TaskSpec("a", "regression"), TaskSpec("b", "regression")]
    labels[2, 0] = float("nan")
    masked = task_losses(TaskOutputs(stack[..., :1], ["a", "b"], [1, 1]), labels, ~torch.isnan(labels), same_type)
    assert not isinstance(masked, TaskLosses)
    assert torch.allclose(masked["a"], (stack[0, [0, 1, 3, 4], 0] ** 2).mean())


def test_fixed_weighting_sums_the_vector_only_with_unit_weights():
    per_task = torch.tensor([1.0, 2.0, 4.0])
    tasks = [TaskSpec("a"), TaskSpec("b"), TaskSpec("c")]
    assert FixedWeighting(tasks)(TaskLosses(per_task, ["a", "b", "c"]))[0].item() == 7.0
    weighted = [TaskSpec("a", weight=0.5), TaskSpec("b"), TaskSpec("c", weight=0.0)]
    assert FixedWeighting(weighted)(TaskLosses(per_task, ["a", "b", "c"]))[0].item() == 2.5
    losses = TaskLosses(per_task, ["a", "b", "c"])
    losses["b"] = torch.tensor(10.0)
    assert FixedWeighting(tasks)(losses)[0].item() == 15.0
