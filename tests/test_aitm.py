"""AITM (adaptive information transfer) and the conversion-funnel generator."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtlkit import ConfigError, TaskSpec
from mtlkit.data import make_funnel
from mtlkit.experiments.tabular_run import RunConfig, train_run
from mtlkit.models import build_model, funnel_violation
from mtlkit.objectives.gradient_surgery import pcgrad
from mtlkit.training import Trainer, TrainerConfig

from in_process import run_cli, run_example

FUNNEL = [TaskSpec("click", "binary"), TaskSpec("cart", "binary"), TaskSpec("buy", "binary")]


def _reference_forward(model, x):
    """AITM written out task by task from the paper's equations, reading the model's parameters."""
    bottoms, width = model.bottoms.linears, model.bottoms.output_dim
    q = []
    for k in range(len(model.tasks)):
        h = x
        for i, layer in enumerate(bottoms):
            h = F.relu(h @ layer.stack_weight(k) + layer.bias[k])
        q.append(h)
    z = [q[0]]
    for t in range(1, len(q)):
        p = F.relu(z[-1] @ model.transfer.weight[t - 1] + model.transfer.bias[t - 1])
        h1, h2, h3 = (model.attention[t - 1][:, j * width:(j + 1) * width] for j in range(3))
        scores = torch.stack([(u @ h1 * (u @ h2)).sum(1) for u in (p, q[t])]) / math.sqrt(width)
        w = torch.softmax(scores, dim=0)
        z.append(w[0, :, None] * (p @ h3) + w[1, :, None] * (q[t] @ h3))
    head = model.towers.net.linears[0]
    return {task.name: z[k] @ head.weight[k] + head.bias[k] for k, task in enumerate(model.tasks)}


def test_aitm_computes_the_papers_equations():
    torch.manual_seed(0)
    model = build_model("aitm", input_dim=7, tasks=FUNNEL, bottom_hidden=[12, 6])
    x = torch.randn(11, 7)
    expected = _reference_forward(model, x)
    for name, value in model(x).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6)


def test_information_flows_only_down_the_funnel():
    torch.manual_seed(0)
    model = build_model("aitm", input_dim=5, tasks=FUNNEL, bottom_hidden=[8])
    outputs = model(torch.randn(16, 5))
    first_layer = model.bottoms.linears[0].weight  # [in, K * width]: task k's network in columns k*8..
    for k, task in enumerate(FUNNEL):
        grad = torch.autograd.grad(outputs[task.name].sum(), first_layer, retain_graph=True)[0].view(5, 3, 8)
        used = grad.abs().sum(dim=(0, 2))
        assert (used[: k + 1] > 0).all() and (used[k + 1:] == 0).all(), (task.name, used)


def test_the_calibrator_penalises_later_steps_predicted_likelier():
    model = build_model("aitm", input_dim=4, tasks=[*FUNNEL, TaskSpec("spend", "regression")], calibration_weight=0.5)
    logits = {"click": torch.tensor([[0.0], [2.0]]), "cart": torch.tensor([[1.0], [-1.0]]),
              "buy": torch.tensor([[3.0], [-2.0]]), "spend": torch.tensor([[50.0], [-50.0]])}
    p = {name: torch.sigmoid(v) for name, v in logits.items() if name != "spend"}
    # Row 0 violates click -> cart and cart -> buy; row 1 nothing. The regression task has no probability.
    expected = 0.5 * ((p["cart"][0] - p["click"][0]) + (p["buy"][0] - p["cart"][0])) / 2
    torch.testing.assert_close(model.auxiliary_loss(logits), expected[0])
    assert model.calibrated_pairs == [("click", "cart"), ("cart", "buy")]
    assert build_model("aitm", input_dim=4, tasks=FUNNEL, calibration_weight=0).auxiliary_loss(logits) is None
    assert (funnel_violation(logits["click"], logits["cart"]) >= 0).all()


@pytest.mark.parametrize("value", [-0.1, float("nan"), "big", True])
def test_bad_calibration_weight(value):
    with pytest.raises(ConfigError, match="calibration_weight"):
        build_model("aitm", input_dim=4, tasks=FUNNEL, calibration_weight=value)


def _funnel_tensors(rows):
    return make_funnel(["click", "cart", "buy"], [0.3, 0.4, 0.4], num_rows=rows, input_dim=8).to_tensors()


def test_the_trainer_adds_the_auxiliary_loss_to_the_objective():
    torch.manual_seed(0)
    data = _funnel_tensors(512)
    model = build_model("aitm", input_dim=8, tasks=FUNNEL, calibration_weight=2.0)
    trainer = Trainer(model, TrainerConfig(max_steps=1, batch_size=512, progress=False))
    batch = next(iter(data.batches(512)))
    total, losses = trainer.batch_objective(batch)
    outputs = model(batch.inputs)
    torch.testing.assert_close(total, sum(losses.values()) + model.auxiliary_loss(outputs))
    assert float(model.auxiliary_loss(outputs).detach()) > 0


def test_pcgrad_adds_the_auxiliary_gradient_unprojected():
    torch.manual_seed(0)
    data = _funnel_tensors(256)
    model = build_model("aitm", input_dim=8, tasks=FUNNEL, calibration_weight=3.0)
    trainer = Trainer(model, TrainerConfig(max_steps=1, batch_size=256, progress=False, gradient_surgery="pcgrad"))
    batch = next(iter(data.batches(256)))
    _, losses, auxiliary = trainer._step_objective(batch)
    parameters = list(model.parameters())

    def flat(term):
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(term, parameters, retain_graph=True)])

    own = torch.stack([flat(losses[t.name]) for t in FUNNEL])
    expected = pcgrad(own, torch.Generator().manual_seed(trainer.config.seed)) + flat(auxiliary)
    trainer._surgery_backward(losses, auxiliary)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in parameters]), expected)


def _violations(model, inputs):
    predicted = torch.stack(list(model.predict(inputs).values()), dim=1)
    return float((predicted[:, 1:] > predicted[:, :-1]).any(dim=1).float().mean())


def test_the_calibrator_keeps_predictions_in_funnel_order():
    """Trained alike, the calibrated model predicts a later step likelier than the one before on
    fewer rows, and ranks the steps about as well."""
    # Steps that nearly always follow the one before: an uncalibrated model often ranks them above it.
    tensors = make_funnel(["click", "cart", "buy"], [0.5, 0.9, 0.9], num_rows=6000, input_dim=8, seed=0).to_tensors()
    train, test = tensors.split([0.8, 0.2], seed=0)
    scores = {}
    for weight in (0.0, 5.0):
        torch.manual_seed(0)
        model = build_model("aitm", input_dim=8, tasks=FUNNEL, bottom_hidden=[32, 16], calibration_weight=weight)
        result = Trainer(model, TrainerConfig(max_epochs=4, batch_size=128, progress=False, patience=None)).fit(train, test)
        scores[weight] = (_violations(model, test.inputs), result.final("valid"))
    assert scores[5.0][0] < 0.25 * scores[0.0][0]  # seeds 0-3: 0.18 -> 0.006, 0.31 -> 0.026, 0.45 -> 0.043, 0.43 -> 0.027
    for task in FUNNEL:
        assert scores[5.0][1][task.name]["auc"] > 0.55
        assert scores[5.0][1][task.name]["auc"] > scores[0.0][1][task.name]["auc"] - 0.03


def test_make_funnel_draws_nested_events_at_the_requested_rates():
    data = make_funnel(["click", "cart", "buy"], [0.2, 0.3, 0.3], num_rows=40_000, seed=3)
    labels = data.labels.numpy()
    assert (labels[:, 1:] <= labels[:, :-1]).all()
    # The first step's rate is exact on the rows drawn; later steps are rarer (0.3 of the step before,
    # on average over all rows, not over the rows that reached it).
    assert data.probabilities[:, 0].mean() == pytest.approx(0.2, rel=1e-6)
    assert (np.diff(data.probabilities, axis=1) <= 0).all()
    np.testing.assert_allclose(labels.mean(0), data.probabilities.mean(0), rtol=0.15)
    again = make_funnel(["click", "cart", "buy"], [0.2, 0.3, 0.3], num_rows=40_000, seed=3)
    assert torch.equal(again.inputs, data.inputs) and torch.equal(again.labels, data.labels)
    assert [t.name for t in data.tasks] == ["click", "cart", "buy"] and all(t.type == "binary" for t in data.tasks)
    # Split as MultiTaskTensors.split cuts them: the same rows, each with its true probabilities.
    parts = data.split([0.8, 0.1, 0.1], seed=7)
    tables = data.to_tensors().split([0.8, 0.1, 0.1], seed=7)
    assert [len(p.inputs) for p in parts] == [32_000, 4_000, 4_000]
    for part, table in zip(parts, tables):
        assert torch.equal(part.inputs, table.inputs) and torch.equal(part.labels, table.labels)
        rows = [int(torch.nonzero((data.inputs == row).all(1))[0]) for row in part.inputs[:5]]
        np.testing.assert_array_equal(part.probabilities[:5], data.probabilities[rows])


@pytest.mark.parametrize("options, message", [
    (dict(steps=["a", "a"], step_rates=[0.1, 0.1]), "steps"),
    (dict(steps=["a", "b"], step_rates=[0.1]), "step_rates"),
    (dict(steps=["a"], step_rates=[1.0]), "step_rates"),
    (dict(num_rows=1), "num_rows"),
    (dict(input_dim=1), "input_dim"),
])
def test_make_funnel_rejects_bad_options(options, message):
    with pytest.raises(ConfigError, match=message):
        make_funnel(**options)


def test_aitm_from_a_table(shared_data, tmp_path):
    folder = shared_data / "aliexpress_sample"
    config = RunConfig(
        data={"train": str(folder / "aliexpress_train_sample.csv"), "test": str(folder / "aliexpress_test_sample.csv"),
              "valid_fraction": 0.2},
        schema={"tasks": ["click", "conversion"], "dense": [f"numerical_{i}" for i in range(1, 64)],
                "categorical": [f"categorical_{i}" for i in range(1, 17)]},
        model={"name": "aitm", "bottom_hidden": [16, 8]},
        training={"max_epochs": 2, "batch_size": 16, "progress": False})
    metrics = json.loads((train_run(config, tmp_path / "run") / "metrics.json").read_text())
    assert metrics["model"] == "aitm"
    assert metrics["test"]["conversion"]["count"] == 20


def test_the_funnel_example_runs():

    done = run_example("funnel_aitm.py", "--seeds", "1", "--rows", "3000", "--epochs", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "true probabilities" in done.stdout and "aitm" in done.stdout


def test_funnel_labels_are_recognised():
    import pandas as pd

    from mtlkit.data.schema import is_funnel

    frame = pd.DataFrame({"click": [1, 1, 0, 1, None], "buy": [1, 0, 0, None, 0], "again": [1, 0, 0, 0, 0],
                          "spend": [3.5, 0, 0, 1, 0], "other": [0, 1, 1, 0, 0]})
    assert is_funnel(frame, ["click", "buy"]) and is_funnel(frame, ["click", "buy", "again"])
    assert not is_funnel(frame, ["buy", "click"])  # a click without a purchase breaks the reversed order
    assert not is_funnel(frame, ["click", "other"]) and not is_funnel(frame, ["click", "spend"]) and not is_funnel(frame, ["click"])
    assert not is_funnel(frame.assign(buy=0), ["click", "buy"])  # a step without positives


def test_init_config_points_at_the_funnel_models(shared_data, tmp_path):

    table = shared_data / "aliexpress_sample" / "aliexpress_train_sample.csv"
    done = run_cli("init-config", "--data", str(table), "--labels", "click,conversion", "--out", str(tmp_path / "run.yaml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "form a funnel" in done.stdout and "aitm" in done.stdout
