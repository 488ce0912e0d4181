"""PCGrad, alone and in the trainer."""

import pytest
import torch

from mtlkit import ConfigError, TaskSpec
from mtlkit.data import MultiTaskTensors
from mtlkit.models import build_model
from mtlkit.objectives import list_gradient_surgeries, pcgrad
from mtlkit.training import Trainer, TrainerConfig


def test_pcgrad_projects_conflicting_gradients_only():
    generator = torch.Generator().manual_seed(0)
    # g1 . g2 = -1: each loses its component along the other, and neither conflicts any more.
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    torch.testing.assert_close(pcgrad(grads, generator), torch.tensor([0.5 + 0.0, 0.5 + 1.0]))
    first, second = torch.tensor([0.5, 0.5]), torch.tensor([0.0, 1.0])  # the projections, by hand
    assert torch.dot(first, grads[1]) == 0 and torch.dot(second, grads[0]) == 0
    # No conflict: the plain sum, bit for bit; a task without gradient changes nothing and makes no NaN.
    agreeing = torch.randn(3, 50, generator=generator).abs()
    assert torch.equal(pcgrad(agreeing, generator), agreeing.clone().sum(0))
    with_zero = torch.cat([grads, torch.zeros(1, 2)])
    torch.testing.assert_close(pcgrad(with_zero, generator), torch.tensor([0.5, 1.5]))


def test_pcgrad_with_two_tasks_never_opposes_either():
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        grads = torch.randn(2, 30, generator=generator, dtype=torch.double)
        combined = pcgrad(grads, generator)
        assert (grads @ combined >= -1e-12).all()
    three = torch.randn(3, 30, generator=torch.Generator().manual_seed(2))
    assert torch.equal(pcgrad(three, torch.Generator().manual_seed(5)), pcgrad(three, torch.Generator().manual_seed(5)))


def _data(second_label_sign: float):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 8, generator=g)
    y = torch.sin(x[:, :1]) + x[:, 1:2]
    return MultiTaskTensors(x, torch.cat([y, second_label_sign * y], 1), ["a", "b"])


TASKS = [TaskSpec("a", "regression"), TaskSpec("b", "regression")]


@pytest.mark.parametrize("model_name", ["shared_bottom", "mmoe", "ple"])
def test_a_surgery_that_sums_trains_exactly_as_the_weighted_sum(model_name, monkeypatch):
    """The per-task gradients, flattened and written back, are the plain backward's pieces: summing
    them (task weights 2 and 0.5 applied) trains the same parameters as ``total.backward()``."""
    tasks = [TaskSpec("a", "regression", weight=2.0), TaskSpec("b", "regression", weight=0.5)]
    trained = []
    for surgery in (None, "sum"):
        torch.manual_seed(0)
        model = build_model(model_name, input_dim=8, tasks=tasks)
        trainer = Trainer(model, TrainerConfig(max_steps=15, batch_size=100, progress=False,
                                               gradient_surgery=None if surgery is None else "pcgrad"))
        if surgery:
            monkeypatch.setattr(trainer, "_surgery", lambda grads, generator: grads.sum(0))
        trainer.fit(_data(-1.0))
        trained.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(trained[1], trained[0], atol=1e-6, rtol=1e-5)


def test_the_trainer_steps_pcgrad_of_each_tasks_own_gradient():
    torch.manual_seed(0)
    model = build_model("mmoe", input_dim=8, tasks=TASKS)
    trainer = Trainer(model, TrainerConfig(max_steps=1, batch_size=100, progress=False, gradient_surgery="pcgrad"))
    batch = next(iter(_data(-1.0).batches(100)))
    _, losses = trainer.batch_objective(batch)
    parameters = list(model.parameters())
    own = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[t.name], parameters, retain_graph=True)])
                       for t in TASKS])
    expected = pcgrad(own, torch.Generator().manual_seed(trainer.config.seed))
    trainer._surgery_backward(losses)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in parameters]), expected)
    assert (own @ expected >= -1e-6).all()


def test_tasks_of_weight_zero_take_no_backward_pass(monkeypatch):
    """A weight-0 task (ESMM's CVR) has no gradient to project; with every weight 0 nothing moves."""
    tasks = [TaskSpec("a", "regression", weight=0.0), TaskSpec("b", "regression", weight=0.0)]
    torch.manual_seed(0)
    model = build_model("mmoe", input_dim=8, tasks=tasks)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []
    trainer = Trainer(model, TrainerConfig(max_steps=3, batch_size=100, progress=False, gradient_surgery="pcgrad"))
    monkeypatch.setattr(trainer, "_surgery", lambda grads, generator: calls.append(grads) or grads.sum(0))
    trainer.fit(_data(1.0))
    assert calls == [] and all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("options, message", [
    (dict(gradient_surgery="cagrad"), r"gradient_surgery.*'cagrad'.*\['pcgrad'\]"),
    (dict(gradient_surgery="pcgrad", weighting="uncertainty"), "without parameters"),
])
def test_bad_gradient_surgery_options(options, message):
    with pytest.raises(ConfigError, match=message):
        Trainer(build_model("mmoe", input_dim=8, tasks=TASKS), TrainerConfig(max_steps=1, progress=False, **options))
    assert list_gradient_surgeries() == ["pcgrad"]


def test_the_pcgrad_example_runs():
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "examples/pcgrad_synthetic.py", "--seeds", "1", "--correlations", "0", "--steps", "20"],
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ratio_mean" in done.stdout and "shared_bottom" in done.stdout
