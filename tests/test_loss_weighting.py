"""Adaptive loss weightings: Dynamic Weight Average, GradNorm, RLW, FAMO and GLS, against their papers' formulas."""

import math

import pytest
import torch

from mtlkit import ConfigError, TaskSpec
from mtlkit.data import MultiTaskTensors, make_synthetic
from mtlkit.models import build_model
from mtlkit.objectives import (DynamicWeightAverage, FastAdaptiveWeighting, GeometricLossWeighting, GradNormWeighting, RandomLossWeighting,
                               build_weighting)
from mtlkit.training import Trainer, TrainerConfig, evaluate

from in_process import run_example


def test_dwa_follows_the_ratio_of_the_last_two_epochs_mean_losses():
    tasks = [TaskSpec("a", weight=2.0), TaskSpec("b"), TaskSpec("c")]
    dwa = DynamicWeightAverage(tasks, temperature=2.0)
    epochs = [[(4.0, 1.0, 2.0), (2.0, 3.0, 2.0)], [(2.0, 1.0, 1.0), (2.0, 1.0, 3.0)], [(1.0, 1.0, 1.0)]]
    for epoch, steps in enumerate(epochs):
        for values in steps:
            losses = dict(zip("abc", map(torch.tensor, values)))
            total, weights = dwa(losses)
            assert total.item() == pytest.approx(sum(weights[k] * v for k, v in zip("abc", values)))
        if epoch == 0:  # one epoch seen: the tasks' own weights
            dwa.on_epoch_end(epoch)
            assert dwa.weights == {"a": 2.0, "b": 1.0, "c": 1.0}
        elif epoch == 1:
            dwa.on_epoch_end(epoch)
            ratios = [2.0 / 3.0, 1.0 / 2.0, 2.0 / 2.0]  # epoch means (2, 1, 2) over (3, 2, 2)
            soft = [math.exp(r / 2) for r in ratios]
            expected = [3 * s / sum(soft) for s in soft]
            for name, base, value in zip("abc", (2.0, 1.0, 1.0), expected):
                assert dwa.weights[name] == pytest.approx(base * value)
            assert dwa.current_weights() == pytest.approx(dwa.weights)
    dwa.on_epoch_end(2)  # now the ratios of epoch 3 over epoch 2: (0.5, 1, 0.5)
    soft = [math.exp(r / 2) for r in (0.5, 1.0, 0.5)]
    assert dwa.weights["b"] == pytest.approx(3 * soft[1] / sum(soft))
    with pytest.raises(ConfigError, match="weighting.temperature"):
        build_weighting("dwa", tasks, temperature=0)


def _shared_model_and_losses(scale_b: float = 1.0):
    torch.manual_seed(0)
    model = build_model("shared_bottom", input_dim=5, tasks=["a", "b"], bottom_hidden=[6], tower_hidden=[3])
    x = torch.randn(40, 5)
    outputs = model(x)
    losses = {"a": outputs["a"].pow(2).mean(), "b": scale_b * (outputs["b"] - 1).pow(2).mean()}
    return model, losses


def test_gradnorm_gradient_is_the_papers_loss_gradient():
    model, losses = _shared_model_and_losses()
    weighting = GradNormWeighting([TaskSpec("a"), TaskSpec("b")], alpha=1.5)
    with torch.no_grad():
        weighting.logits.copy_(torch.tensor([0.3, -0.2]))
        weighting.initial_losses.copy_(torch.tensor([2.0, 0.5]))
    shared = model.shared_layer_parameters()
    weighting.balance(losses, shared)

    # By hand: G_k = w_k ||grad_W L_k||, r_k = (L_k / L_k(0)) / mean, target = mean(G) r^alpha held constant.
    logits = torch.tensor([0.3, -0.2], requires_grad=True)
    w = 2 * torch.softmax(logits, 0)
    norms = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[k], shared, retain_graph=True)]).norm()
                         for k in "ab"])
    G = w * norms
    ratio = torch.stack([losses["a"].detach() / 2.0, losses["b"].detach() / 0.5])
    target = (G.mean() * (ratio / ratio.mean()) ** 1.5).detach()
    (expected,) = torch.autograd.grad((G - target).abs().sum(), logits)
    torch.testing.assert_close(weighting.logits.grad, expected)

    total, weights = weighting(losses)  # the model's objective holds the weights constant
    torch.testing.assert_close(total, weights["a"] * losses["a"] + weights["b"] * losses["b"])
    total.backward()  # the graphs were kept for the model's backward
    assert model.shared_layer_parameters()[0].grad is not None
    assert sum(weighting.current_weights().values()) == pytest.approx(2.0)


def test_gradnorm_takes_weight_from_the_task_with_the_larger_gradients():
    """Task y2's labels are 10x task y1's: its loss and gradients dwarf y1's. GradNorm moves weight to
    y1, step by step (Adam moves the logits by about the learning rate a step; the fixed weighting
    would keep 1 and 1)."""
    data = make_synthetic(correlation=0.5, num_rows=2000, input_dim=20, num_sine_terms=0, seed=0)
    tensors = data.to_tensors()
    labels = tensors.labels.clone()
    labels[:, 1] *= 10
    tensors = MultiTaskTensors(tensors.inputs, labels, tensors.task_names)
    torch.manual_seed(0)
    model = build_model("mmoe", input_dim=20, tasks=data.tasks, num_experts=4)
    config = TrainerConfig(max_steps=200, max_epochs=None, batch_size=128, eval_every=100, progress=False,
                           weighting="gradnorm", weighting_options={"alpha": 1.0})
    trainer = Trainer(model, config)
    result = trainer.fit(tensors)
    weights = trainer.weighting.current_weights()
    assert weights["y1"] > 1.5 * weights["y2"] and sum(weights.values()) == pytest.approx(2.0)
    logged = [row["weight"] for row in result.history if row["split"] == "train" and row["task"] == "y1"]
    assert logged[-1] == pytest.approx(weights["y1"]) and 1.0 < logged[0] < logged[1]


@pytest.mark.parametrize("name", ["single_task", "cross_stitch"])
def test_gradnorm_needs_a_shared_layer(name):
    data = make_synthetic(correlation=0.5, num_rows=200, input_dim=8, seed=0)
    model = build_model(name, input_dim=8, tasks=data.tasks)
    with pytest.raises(ConfigError, match="no layer that every task shares"):
        Trainer(model, TrainerConfig(weighting="gradnorm", progress=False))
    with pytest.raises(ConfigError, match="weighting.alpha"):
        build_weighting("gradnorm", data.tasks, alpha=-1)
    with pytest.raises(ConfigError, match="gradient_surgery"):
        Trainer(build_model("mmoe", input_dim=8, tasks=data.tasks),
                TrainerConfig(weighting="gradnorm", gradient_surgery="pcgrad", progress=False))


@pytest.mark.parametrize("options", [{"weighting": "gradnorm"}, {"gradient_surgery": "pcgrad"}])
def test_per_task_backward_passes_train_eagerly_under_the_compile_switch(options):
    # A second backward through one compiled graph gave zero gradients (torch 2.13), so these stay eager.
    data = make_synthetic(correlation=0.5, num_rows=600, input_dim=20, num_sine_terms=0, seed=0)
    train, valid = data.to_tensors().split([0.8, 0.2], seed=0)

    def history(compile: bool):
        torch.manual_seed(0)
        model = build_model("ple", input_dim=20, tasks=data.tasks, num_levels=2, expert_hidden=[8])
        config = TrainerConfig(max_steps=10, max_epochs=None, eval_every=5, batch_size=64, progress=False,
                               compile=compile, **options)
        return Trainer(model, config).fit(train, valid).history

    with pytest.warns(UserWarning, match="training.compile: not used"):
        compiled = history(True)
    assert compiled == history(False)


def test_the_loss_weighting_example_runs():
    done = run_example("loss_weighting.py", "--seeds", "1", "--rows", "3000", "--weightings", "fixed,dwa,gradnorm,uncertainty+imtl")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "gradnorm" in done.stdout and "uncertainty+imtl" in done.stdout and "time_vs_fixed" in done.stdout


@pytest.mark.parametrize("weighting, panels", [("fixed", 2), ("gradnorm", 3)])
def test_learning_curves_show_the_weights_when_they_change(tmp_path, monkeypatch, weighting, panels):
    import pandas as pd

    from mtlkit.reports import plots

    data = make_synthetic(correlation=0.5, num_rows=600, input_dim=8, num_sine_terms=0, seed=0)
    torch.manual_seed(0)
    config = TrainerConfig(max_steps=40, max_epochs=None, batch_size=64, eval_every=10, progress=False, weighting=weighting)
    history = pd.DataFrame(Trainer(build_model("mmoe", input_dim=8, tasks=data.tasks), config).fit(data.to_tensors()).history)
    drawn = []
    monkeypatch.setattr(plots, "save_figure", lambda figure, path: drawn.append(len(figure.axes)))
    plots.plot_learning_curves(history, tmp_path / "curves.png")
    assert drawn == [panels]


def test_the_weightings_own_learning_rate():
    # y2's labels 10x y1's: its loss is about 100x, so its log variance has far to go (about log 100).
    data = make_synthetic(correlation=0.5, num_rows=600, input_dim=8, num_sine_terms=0, seed=0)
    tensors = data.to_tensors()
    tensors = MultiTaskTensors(tensors.inputs, tensors.labels * torch.tensor([1.0, 10.0]), tensors.task_names)

    def moved(**options):
        torch.manual_seed(0)
        trainer = Trainer(build_model("mmoe", input_dim=8, tasks=data.tasks),
                          TrainerConfig(max_steps=30, max_epochs=None, batch_size=64, progress=False, weighting="uncertainty",
                                        weight_decay=0.01, **options))
        trainer.fit(tensors)
        return trainer, trainer.weighting.log_variance.detach()[1].item()

    trainer, fast = moved(weighting_learning_rate=0.05)
    assert [(g["lr"], g["weight_decay"]) for g in trainer.optimizer.param_groups] == [(1e-3, 0.01), (0.05, 0.0)]
    _, slow = moved()
    # Adam moves a parameter by about its learning rate a step: 30 steps reach about 1.5 and 0.03.
    assert fast > 1.0 and 0 < slow < 0.05
    with pytest.raises(ConfigError, match="weighting_learning_rate: weighting 'fixed' learns no parameters"):
        Trainer(build_model("mmoe", input_dim=8, tasks=data.tasks), TrainerConfig(weighting_learning_rate=0.1, progress=False))
    with pytest.raises(ConfigError, match="weighting_learning_rate"):
        TrainerConfig(weighting_learning_rate=0)


def test_random_loss_weighting_draws_fresh_weights_that_sum_to_k_from_its_own_seed():
    tasks = [TaskSpec("a", "regression"), TaskSpec("b", "regression", weight=2.0), TaskSpec("c", "regression")]
    losses = {"a": torch.tensor(1.0), "b": torch.tensor(2.0), "c": torch.tensor(3.0)}
    weighting = build_weighting("rlw", tasks, seed=5)
    assert isinstance(weighting, RandomLossWeighting)
    torch.manual_seed(0)
    drawn = []
    for _ in range(200):
        total, weights = weighting(losses)
        w = torch.tensor([weights["a"], weights["b"] / 2, weights["c"]])  # the task's own weight multiplies the draw
        assert (w > 0).all() and w.sum().item() == pytest.approx(3.0, rel=1e-6)
        assert total.item() == pytest.approx(weights["a"] * 1 + weights["b"] * 2 + weights["c"] * 3, rel=1e-6)
        drawn.append(w)
    drawn = torch.stack(drawn)
    assert drawn.std(0).min() > 0.2 and (drawn.mean(0) - 1).abs().max() < 0.2  # fresh each step, 1 on average
    torch.manual_seed(123)  # the global generator plays no part
    again = build_weighting("rlw", tasks, seed=5)
    assert [again(losses)[1]["a"] for _ in range(3)] == pytest.approx(drawn[:3, 0].tolist())
    assert weighting.current_weights() == weights
    with pytest.raises(ConfigError, match="weighting.seed: expected an integer >= 0"):
        build_weighting("rlw", tasks, seed=-1)


def test_famo_weights_each_task_by_its_mix_over_its_loss():
    tasks = [TaskSpec("a", "regression"), TaskSpec("b", "regression", weight=2.0), TaskSpec("c", "regression")]
    famo = build_weighting("famo", tasks, min_losses={"c": 0.5})
    assert isinstance(famo, FastAdaptiveWeighting)
    famo.logits.copy_(torch.tensor([0.3, -0.2, 0.1]))
    values = torch.tensor([2.0, 0.5, 1.5], requires_grad=True)
    total, weights = famo(dict(zip("abc", values.unbind())))
    total.backward()
    # Task k's gradient is weighted by K w_k0 z_k / (c (L_k - m_k)), c = sum_k z_k / (L_k - m_k).
    z = torch.softmax(torch.tensor([0.3, -0.2, 0.1]), 0)
    gaps = torch.tensor([2.0, 0.5, 1.0]) + 1e-8
    expected = 3 * torch.tensor([1.0, 2.0, 1.0]) * (z / gaps) / (z / gaps).sum()
    torch.testing.assert_close(values.grad, expected)
    torch.testing.assert_close(torch.stack([weights[n] for n in "abc"]), expected)
    assert list(famo.current_weights().values()) == pytest.approx(expected.tolist())
    # Scaling a task's loss does not change the ratios of w_k L_k between tasks (its weight scales inversely).
    scaled = torch.tensor([200.0, 0.5, 1.5], requires_grad=True)
    _, rescaled = famo(dict(zip("abc", scaled.unbind())))
    ratio = (200.0 * rescaled["a"]) / (2.0 * weights["a"])  # d total / d log L_a, before and after
    assert float(ratio) == pytest.approx(float(rescaled["b"] / weights["b"]), rel=1e-6)


def test_famo_logits_follow_adam_on_the_softmax_jacobian_times_the_log_improvements():
    """The reference's update: Adam (with L2 decay) on xi with gradient
    ``autograd.grad(softmax(xi), xi, grad_outputs=log(L - m) - log(L' - m))``."""
    tasks = [TaskSpec("a", "regression"), TaskSpec("b", "regression"), TaskSpec("c", "regression")]
    famo = build_weighting("famo", tasks, learning_rate=0.05, weight_decay=0.01)
    xi = torch.zeros(3, requires_grad=True)
    reference = torch.optim.Adam([xi], lr=0.05, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        before = torch.rand(3, generator=generator) + 0.5
        after = before * (torch.rand(3, generator=generator) * 0.5 + 0.6)
        famo(dict(zip("abc", before.unbind())))
        famo.after_step(dict(zip("abc", after.unbind())))
        delta = (before + 1e-8).log() - (after + 1e-8).log()
        xi.grad = torch.autograd.grad(torch.softmax(xi, 0), xi, grad_outputs=delta)[0]
        reference.step()
        torch.testing.assert_close(famo.logits, xi.detach())
    # The task that improved most loses weight: a alone improves.
    famo = build_weighting("famo", tasks)
    famo(dict(a=torch.tensor(1.0), b=torch.tensor(1.0), c=torch.tensor(1.0)))
    famo.after_step(dict(a=torch.tensor(0.5), b=torch.tensor(1.0), c=torch.tensor(1.0)))
    assert famo.logits[0] < 0 < famo.logits[1] == famo.logits[2]


def test_famo_leaves_out_tasks_without_rows_or_weight():
    tasks = [TaskSpec("a", "binary"), TaskSpec("b", "binary", weight=0.0), TaskSpec("c", "binary")]
    famo = build_weighting("famo", tasks)
    # c has no labelled row in the batch (its loss is an exact 0): it would otherwise take every weight.
    values = torch.tensor([0.7, float("nan"), 0.0], requires_grad=True)
    total, weights = famo(dict(zip("abc", values.unbind())))
    total.backward()
    assert torch.isfinite(total) and float(weights["a"]) == pytest.approx(2.0)  # K counts the tasks of non-zero weight
    assert float(weights["b"]) == float(weights["c"]) == 0.0
    torch.testing.assert_close(values.grad, torch.tensor([2.0, 0.0, 0.0]))
    famo.after_step(dict(a=torch.tensor(0.6), b=torch.tensor(0.5), c=torch.tensor(0.4)))
    assert torch.isfinite(famo.logits).all() and famo.logits[1] == 0  # only the tasks present both times moved


@pytest.mark.parametrize("options, message", [
    ({}, r"min_losses: task 'visits' \(poisson\) may have a negative loss"),
    ({"min_losses": {"visitz": -1.0}}, r"min_losses: unknown task\(s\) \['visitz'\]"),
    ({"min_losses": {"visits": -10.0}, "learning_rate": 0}, "weighting.learning_rate: expected a number > 0"),
    ({"min_losses": [1.0]}, "min_losses: expected a mapping"),
])
def test_famo_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        build_weighting("famo", [TaskSpec("click", "binary"), TaskSpec("visits", "poisson")], **options)


@pytest.mark.parametrize("weighting", ["famo", "gls"])
def test_log_weightings_train_the_task_of_small_scale_that_a_fixed_sum_neglects(weighting):
    """Two tasks on shared inputs, one's labels 30 times the other's: the fixed sum follows the large
    task; FAMO's and GLS's log objectives weight each by the inverse of its loss, so the small one
    trains too. The trainer calls FAMO's update once a step, on the step's batch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 8, generator=g)
    small = torch.sin(2 * x[:, :1]) * x[:, 1:2]
    large = 30 * (x[:, 2:3] - torch.cos(x[:, 3:4]))
    data = MultiTaskTensors(x, torch.cat([small, large], 1), ["small", "large"])
    tasks = [TaskSpec("small", "regression"), TaskSpec("large", "regression")]
    losses, calls = {}, []
    for name in ("fixed", weighting):
        torch.manual_seed(0)
        model = build_model("shared_bottom", input_dim=8, tasks=tasks, bottom_hidden=[32], tower_hidden=[8])
        trainer = Trainer(model, TrainerConfig(max_steps=300, max_epochs=None, batch_size=100, progress=False, weighting=name,
                                               learning_rate=3e-3))
        if name == "famo":
            update = trainer.weighting.after_step
            trainer.weighting.after_step = lambda step_losses: calls.append(1) or update(step_losses)
        trainer.fit(data)
        losses[name] = {t.name: v["loss"] for t, v in zip(tasks, evaluate(model, data, tasks).values())}
    assert len(calls) == (300 if weighting == "famo" else 0)
    assert losses[weighting]["small"] < 0.8 * losses["fixed"]["small"], losses


def test_gls_is_the_weighted_geometric_mean_of_the_losses():
    tasks = [TaskSpec("a", "regression"), TaskSpec("b", "binary", weight=2.0), TaskSpec("c", "regression", weight=0.0)]
    gls = build_weighting("gls", tasks)
    assert isinstance(gls, GeometricLossWeighting)
    values = torch.tensor([2.0, 0.5, float("nan")], requires_grad=True)  # c: weight 0 (ESMM's CVR), its loss plays no part
    total, weights = gls(dict(zip("abc", values.unbind())))
    total.backward()
    geometric = (2.0 ** 1 * 0.5 ** 2) ** (1 / 3)
    assert total.item() == pytest.approx(3 * geometric)
    expected = torch.tensor([1 * geometric / 2.0, 2 * geometric / 0.5, 0.0])  # w_k G / L_k
    torch.testing.assert_close(values.grad, expected)
    assert list(gls.current_weights().values()) == pytest.approx(expected.tolist())
    # Equal losses: the fixed weights. A task without labelled rows (loss 0) drops out of the mean.
    _, equal = gls(dict(a=torch.tensor(0.7), b=torch.tensor(0.7), c=torch.tensor(0.7)))
    assert [float(equal[n]) for n in "abc"] == pytest.approx([1.0, 2.0, 0.0])
    empty = torch.tensor([0.0, 0.5, 0.3], requires_grad=True)
    total, _ = gls(dict(zip("abc", empty.unbind())))
    total.backward()
    assert total.item() == pytest.approx(2 * 0.5) and empty.grad.tolist() == pytest.approx([0.0, 2.0, 0.0])
    with pytest.raises(ConfigError, match=r"weighting gls: task 'visits' \(poisson\) may have a negative loss"):
        build_weighting("gls", [TaskSpec("click", "binary"), TaskSpec("visits", "poisson")])
