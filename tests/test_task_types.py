"""The huber, poisson and ziln task types: their losses, metrics and what they buy over squared error."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import mean_poisson_deviance

from mtlkit import DataError, TaskSpec
from mtlkit.data import MultiTaskTensors
from mtlkit.data.schema import TableSchema
from mtlkit.features import TablePreprocessor
from mtlkit.models import build_model
from mtlkit.training import Trainer, TrainerConfig, evaluate
from mtlkit.training.metrics import poisson_deviance, roc_auc

from in_process import run_example


def test_losses_and_deviance_match_their_definitions():
    g = torch.Generator().manual_seed(0)
    output, label = torch.randn(50, 1, generator=g), torch.poisson(torch.full((50,), 2.0), generator=g)
    poisson, huber = TaskSpec("n", "poisson").task_type, TaskSpec("v", "huber").task_type
    torch.testing.assert_close(poisson.loss(output, label), torch.exp(output[:, 0]) - label * output[:, 0])
    torch.testing.assert_close(huber.loss(output, 3 * label), F.huber_loss(output[:, 0], 3 * label, reduction="none"))
    rates = torch.exp(output[:, 0])
    assert poisson_deviance(rates, label) == pytest.approx(mean_poisson_deviance(label.numpy(), rates.double().numpy()), rel=1e-9)
    assert poisson_deviance(label.clamp_min(1e-9), label) == pytest.approx(0.0, abs=1e-6)


def _fit(tasks, x, labels, steps=600, **config):
    torch.manual_seed(0)
    model = build_model("mmoe", input_dim=x.shape[1], tasks=tasks, num_experts=4, expert_hidden=[16], tower_hidden=[8])
    data = MultiTaskTensors(x, labels, [t.name for t in tasks])
    Trainer(model, TrainerConfig(max_steps=steps, max_epochs=None, batch_size=128, learning_rate=0.01, progress=False,
                                 **config)).fit(data)
    return model


def test_a_poisson_task_learns_the_rate_of_its_counts():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6000, 5, generator=g)
    rate = torch.exp(0.8 * x[:, 0] - 0.5 * x[:, 1] + 0.3)
    counts = torch.poisson(rate, generator=g)
    click = (torch.rand(6000, generator=g) < torch.sigmoid(x[:, 2])).float()
    tasks = [TaskSpec("purchases", "poisson"), TaskSpec("click")]
    model = _fit(tasks, x[:5000], torch.stack([counts, click], 1)[:5000])
    test = MultiTaskTensors(x[5000:], torch.stack([counts, click], 1)[5000:], ["purchases", "click"])
    scores = evaluate(model, test, model.tasks)["purchases"]
    predictions = model.predict(x[5000:])
    predicted = predictions["purchases"]
    assert (predicted > 0).all()
    constant = poisson_deviance(torch.full((1000,), counts[:5000].mean().item()), counts[5000:])
    truth = poisson_deviance(rate[5000:], counts[5000:])
    assert scores["deviance"] < truth + 0.3 * (constant - truth)  # most of the way from the mean to the true rates
    assert set(scores) == {"loss", "deviance", "positive_auc", "mae", "count"}
    # Whether a user buys at all: P(count > 0) = 1 - exp(-rate), ranked against the true rates' AUC.
    torch.testing.assert_close(predictions["purchases_p_positive"], 1 - torch.exp(-predicted))
    buyers = (counts[5000:] > 0).float()
    assert scores["positive_auc"] == pytest.approx(roc_auc(predicted, buyers), rel=1e-6)
    assert scores["positive_auc"] > 0.97 * roc_auc(rate[5000:], buyers)


def test_huber_is_pulled_less_by_outliers_than_squared_error():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6000, 5, generator=g)
    clean = x[:, 0] - 0.5 * x[:, 1] + 0.3 * torch.randn(6000, generator=g)
    dirty = clean + 20 * (torch.rand(6000, generator=g) < 0.05).float()  # 5 % of the labels 20 too high
    bias = {}
    for kind in ("regression", "huber"):
        model = _fit([TaskSpec("y", kind)], x[:5000], dirty[:5000, None])
        bias[kind] = (model.predict(x[5000:])["y"] - clean[5000:]).mean().item()
    assert bias["regression"] > 0.7  # squared error predicts the contaminated mean (+1.0)
    assert abs(bias["huber"]) < 0.5 * bias["regression"]


def test_tables_keep_counts_unscaled_and_refuse_negative_ones():
    schema = TableSchema.from_dict({"tasks": [{"name": "orders", "type": "poisson"}, {"name": "spend", "type": "huber"}],
                                    "dense": ["x"]})
    frame = pd.DataFrame({"x": np.arange(10.0), "orders": [0, 1, 2, 0, 3, 1, 0, 0, 5, 1], "spend": np.arange(10.0) * 100})
    preprocessor = TablePreprocessor(schema).fit(frame)
    assert set(preprocessor.label_statistics) == {"spend"}  # huber is standardised like regression; counts stay counts
    encoded = preprocessor.transform(frame)
    torch.testing.assert_close(encoded.tensors.labels[:, 0], torch.tensor(frame["orders"].to_numpy(), dtype=torch.float32))
    with pytest.raises(DataError, match="'orders'.*counts >= 0"):
        preprocessor.transform(frame.assign(orders=frame["orders"] - 2))


def test_ziln_loss_is_the_mixtures_negative_log_likelihood_and_predicts_its_mean():
    from torch.distributions import LogNormal

    g = torch.Generator().manual_seed(3)
    output = torch.randn(200, 3, generator=g, requires_grad=True)
    label = torch.where(torch.rand(200, generator=g) < 0.5, 0.0, torch.exp(2 * torch.randn(200, generator=g)))
    ziln = TaskSpec("spend", "ziln").task_type
    logit, loc, scale = output[:, 0], output[:, 1], F.softplus(output[:, 2])
    positive = label > 0
    expected = torch.where(positive, -F.logsigmoid(logit) - LogNormal(loc, scale).log_prob(label.clamp_min(1e-30)),
                           -F.logsigmoid(-logit))
    loss = ziln.loss(output, label)
    torch.testing.assert_close(loss, expected)
    loss.sum().backward()
    assert torch.isfinite(output.grad).all()
    torch.testing.assert_close(ziln.predict(output), torch.sigmoid(logit) * LogNormal(loc, scale).mean)
    assert TaskSpec("spend", "ziln").output_dim == 3
    # A scale driven to 0 is floored, so the loss stays finite on a positive amount far from loc.
    assert torch.isfinite(ziln.loss(torch.tensor([[0.0, 0.0, -200.0]]), torch.tensor([5.0]))).all()


def test_ziln_tasks_are_scored_together_in_one_pass_over_their_stacked_heads():
    from mtlkit.objectives import TaskLosses, task_losses

    tasks = [TaskSpec("spend", "ziln"), TaskSpec("refund", "ziln")]
    model = build_model("mmoe", input_dim=5, tasks=tasks, num_experts=3, expert_hidden=[8], tower_hidden=[4])
    x, labels, _, _ = _zero_inflated_lognormal(64, seed=1)
    labels = torch.stack([labels[:, 0], labels[:, 0].flip(0)], 1)
    outputs = model(x)
    together = task_losses(outputs, labels, torch.ones_like(labels, dtype=torch.bool), tasks, all_labelled=True)
    assert isinstance(together, TaskLosses)
    for k, task in enumerate(tasks):
        torch.testing.assert_close(together[task.name], task.task_type.loss(outputs[task.name], labels[:, k]).mean())


def _reference_gini(amounts, scores):
    """The lifetime_value package's normalised Gini: gain chart's raw Gini by a stable sort, over the labels' own."""
    def raw(order):
        cumulative = np.cumsum(amounts[order]) / amounts.sum()
        return 2 * cumulative.mean() - 1
    return raw(np.argsort(-scores, kind="stable")) / raw(np.argsort(-amounts, kind="stable"))


def test_normalized_gini_matches_the_reference_counts_ties_in_expectation_and_weights_as_repeats():
    import itertools

    from mtlkit.training.metrics import normalized_gini

    g = torch.Generator().manual_seed(4)
    amounts = torch.where(torch.rand(300, generator=g) < 0.6, 0.0, torch.exp(torch.randn(300, generator=g))).double()
    scores = amounts + 2 * torch.rand(300, generator=g).double()
    assert normalized_gini(scores, amounts) == pytest.approx(_reference_gini(amounts.numpy(), scores.numpy()), rel=1e-12)
    assert normalized_gini(amounts, amounts) == pytest.approx(1.0)
    assert normalized_gini(-amounts, amounts) < -0.5  # ranked upside down
    # One tie, a random ranking: 0 but for the reference's right-endpoint sum (raw Gini 1/n in expectation).
    assert 0 < normalized_gini(torch.zeros(300), amounts) < 0.01
    assert np.isnan(normalized_gini(scores, torch.zeros(300)))
    # Ties: the average of the reference over every order of the tied rows.
    small_amounts = torch.tensor([3.0, 0.0, 1.0, 5.0, 0.5, 2.0], dtype=torch.float64)
    small_scores = torch.tensor([1.0, 1.0, 1.0, 2.0, 0.0, 0.0], dtype=torch.float64)
    ties = ([0, 1, 2], [4, 5])
    values = []
    for first, second in itertools.product(itertools.permutations(ties[0]), itertools.permutations(ties[1])):
        order = [3, *first, *second]
        broken = np.empty(6)
        broken[order] = np.arange(6, 0, -1)  # distinct scores in this order
        values.append(_reference_gini(small_amounts.numpy(), broken))
    assert normalized_gini(small_scores, small_amounts) == pytest.approx(np.mean(values), rel=1e-12)
    # Weights: each row a segment of its weight's width on the gain chart, summed at its right end.
    weight = torch.randint(1, 4, (300,), generator=g).double()

    def weighted_raw(order):
        cumulative = np.cumsum((weight * amounts).numpy()[order]) / (weight * amounts).sum().item()
        return 2 * (weight.numpy()[order] * cumulative).sum() / weight.sum().item() - 1
    expected = weighted_raw(np.argsort(-scores.numpy(), kind="stable")) / weighted_raw(np.argsort(-amounts.numpy(), kind="stable"))
    assert normalized_gini(scores, amounts, weight) == pytest.approx(expected, rel=1e-12)
    # So the same weight on every row changes nothing, and a whole-number weight is that many copies of the row
    # up to the right-end sum's offset (well under 1/n).
    assert normalized_gini(scores, amounts, torch.full((300,), 2.5)) == pytest.approx(normalized_gini(scores, amounts), rel=1e-12)
    repeated = normalized_gini(scores.repeat_interleave(weight.long()), amounts.repeat_interleave(weight.long()))
    assert normalized_gini(scores, amounts, weight) == pytest.approx(repeated, abs=1 / 300)


def _zero_inflated_lognormal(rows, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 5, generator=g)
    buys = torch.sigmoid(1.5 * x[:, 0] - 0.5)
    loc, scale = 1.0 + 0.8 * x[:, 1], 0.8
    amount = torch.exp(loc + scale * torch.randn(rows, generator=g)) * (torch.rand(rows, generator=g) < buys)
    click = (torch.rand(rows, generator=g) < torch.sigmoid(x[:, 2] + x[:, 0])).float()
    return x, torch.stack([amount, click], 1), buys * torch.exp(loc + scale**2 / 2), buys


def test_a_ziln_task_ranks_and_sums_spend_like_its_true_expectation():
    from mtlkit.training.metrics import normalized_gini

    x, labels, expectation, buys = _zero_inflated_lognormal(7000, seed=5)
    tasks = [TaskSpec("spend", "ziln"), TaskSpec("click")]
    model = _fit(tasks, x[:6000], labels[:6000], steps=800)
    test = MultiTaskTensors(x[6000:], labels[6000:], ["spend", "click"])
    scores = evaluate(model, test, model.tasks)["spend"]
    assert set(scores) == {"loss", "gini", "positive_auc", "mae", "mse", "count"}
    predictions = model.predict(x[6000:])
    assert list(predictions) == ["spend", "spend_p_positive", "click"]
    predicted = predictions["spend"]
    assert (predicted > 0).all()
    best = normalized_gini(expectation[6000:], labels[6000:, 0])
    assert scores["gini"] == pytest.approx(normalized_gini(predicted, labels[6000:, 0]), rel=1e-5)
    assert scores["gini"] > 0.95 * best  # 0.98-0.99 of it over seeds 5-9
    assert predicted.sum().item() == pytest.approx(expectation[6000:].sum().item(), rel=0.25)  # 1.03-1.19 over seeds 5-9
    # The side prediction is the probability of spending at all; positive_auc ranks who does by it.
    spends = labels[6000:, 0] > 0
    p_positive = predictions["spend_p_positive"]
    assert scores["positive_auc"] == pytest.approx(roc_auc(p_positive, spends.float()), rel=1e-6)
    assert scores["positive_auc"] > 0.97 * roc_auc(buys[6000:], spends.float())  # 0.992-1.004 of it over seeds 5-9
    assert p_positive.mean().item() == pytest.approx(spends.float().mean().item(), abs=0.1)  # -0.01 to +0.08 over seeds 5-9


def test_a_task_named_like_another_tasks_side_prediction_is_refused():
    from mtlkit import ConfigError
    from mtlkit.tasks import validate_tasks

    with pytest.raises(ConfigError, match="'spend' also predicts spend_p_positive, the name of another task"):
        validate_tasks([{"name": "spend", "type": "ziln"}, {"name": "spend_p_positive"}])
    assert len(validate_tasks([{"name": "spend", "type": "regression"}, {"name": "spend_p_positive"}])) == 2


def test_tables_scale_ziln_amounts_without_centring_them_and_refuse_negative_ones():
    from mtlkit import ConfigError
    from mtlkit.objectives import build_weighting

    schema = TableSchema.from_dict({"tasks": [{"name": "spend", "type": "ziln"}, {"name": "watch", "type": "regression"}],
                                    "dense": ["x"]})
    frame = pd.DataFrame({"x": np.arange(10.0), "spend": [0, 0, 12.5, 0, 3.0, 0, 0, 80.0, 0, 1.5], "watch": np.arange(10.0)})
    preprocessor = TablePreprocessor(schema).fit(frame)
    # Amounts are divided by the geometric mean of the positive ones (zeros stay zeros), not centred.
    geometric_mean = float(np.exp(np.log([12.5, 3.0, 80.0, 1.5]).mean()))
    assert preprocessor.label_statistics["spend"] == pytest.approx({"mean": 0.0, "std": geometric_mean})
    assert set(preprocessor.label_statistics) == {"spend", "watch"}
    torch.testing.assert_close(preprocessor.transform(frame).tensors.labels[:, 0],
                               torch.tensor(frame["spend"].to_numpy() / geometric_mean, dtype=torch.float32))
    predictions = torch.tensor([0.5, 2.0])
    torch.testing.assert_close(preprocessor.to_label_units("spend", predictions), predictions * geometric_mean)
    scores = preprocessor.scores_in_label_units({"spend": {"gini": 0.4, "mae": 1.0, "mse": 1.0, "loss": 0.3}})["spend"]
    assert scores == pytest.approx({"gini": 0.4, "mae": geometric_mean, "mse": geometric_mean**2, "loss": 0.3})
    unscaled = TablePreprocessor(TableSchema.from_dict({**schema.to_dict(), "standardize_labels": False})).fit(frame)
    torch.testing.assert_close(unscaled.transform(frame).tensors.labels[:, 0],
                               torch.tensor(frame["spend"].to_numpy(), dtype=torch.float32))
    with pytest.raises(DataError, match="'spend'.*amounts >= 0"):
        preprocessor.transform(frame.assign(spend=frame["spend"] - 1))
    # Its negative log-likelihood can be negative: GLS refuses it, FAMO asks for its lower bound.
    with pytest.raises(ConfigError, match=r"task 'spend' \(ziln\) may have a negative loss"):
        build_weighting("gls", schema.tasks)
    with pytest.raises(ConfigError, match=r"min_losses: task 'spend' \(ziln\)"):
        build_weighting("famo", schema.tasks)


def test_a_run_folder_scores_a_ziln_task_and_charts_its_deciles(tmp_path):
    from mtlkit.experiments.serving import export_run
    from mtlkit.experiments.tabular_run import RunConfig, _reliability_tables, load_run, predict_run, train_run
    from mtlkit.reports.calibration import POSITIVE_SHARE_AXES, RELIABILITY_AXES, reliability_table

    x, labels, _, _ = _zero_inflated_lognormal(1500, seed=6)
    frame = pd.DataFrame(x.numpy(), columns=[f"x{i}" for i in range(5)]).assign(
        spend=labels[:, 0].numpy(), click=labels[:, 1].numpy(), watch=x[:, 3].numpy() * 60)
    frame.to_csv(tmp_path / "train.csv", index=False)
    config = RunConfig(data={"train": str(tmp_path / "train.csv"), "valid_fraction": 0.2},
                       schema={"tasks": [{"name": "spend", "type": "ziln"}, "click", {"name": "watch", "type": "regression"}],
                               "dense": [f"x{i}" for i in range(5)]},
                       model={"name": "mmoe", "num_experts": 3, "expert_hidden": [16], "tower_hidden": [8]},
                       training={"max_epochs": 3, "batch_size": 64, "progress": False})
    run = train_run(config, tmp_path / "run")
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["valid"]["spend"]) == {"loss", "gini", "positive_auc", "mae", "mse", "count"}
    assert metrics["valid"]["spend"]["gini"] > 0.3 and metrics["valid"]["spend"]["positive_auc"] > 0.6
    # predict writes the probability of a positive amount beside the mean, and the export returns it too.
    predict_run(run, tmp_path / "train.csv", tmp_path / "scores.csv")
    scores = pd.read_csv(tmp_path / "scores.csv")
    assert list(scores.columns) == ["spend", "spend_p_positive", "click", "watch"]
    assert scores["spend_p_positive"].between(0, 1).all() and (scores["spend"] > 0).all()
    served = torch.export.load(export_run(run, tmp_path / "model.pt2")).module()
    loaded = load_run(run)
    expected, _ = loaded.predict(frame)
    out = served(dict(loaded.preprocessor.transform(frame, with_labels=False).tensors.inputs))
    assert list(out) == list(expected) == list(scores.columns)
    for name, value in out.items():
        torch.testing.assert_close(value, expected[name], atol=1e-5, rtol=1e-5)
    report = (run / "report.md").read_text()
    assert (run / "calibration.png").stat().st_size > 0 and "decile chart" in report
    assert "Task spend was trained on its amounts divided by" in report
    # The chart covers the tasks predicted in their labels' units: probabilities and amounts, not standardised values.
    outputs = {"spend": torch.randn(40, 3), "click": torch.randn(40, 1), "watch": torch.randn(40, 1)}
    tasks = [TaskSpec("spend", "ziln"), TaskSpec("click"), TaskSpec("watch", "regression")]
    tensors = MultiTaskTensors(torch.randn(40, 5), torch.cat([labels[:40], torch.randn(40, 1)], 1), ["spend", "click", "watch"])
    tables = _reliability_tables(tasks, outputs, tensors)
    assert list(tables) == ["spend", "spend_p_positive", "click"]
    # The probability of spending at all, decile by decile, against the share of rows that spent.
    spent = labels[:40, 0] > 0
    expected = reliability_table(torch.sigmoid(outputs["spend"][:, 0]), spent.double())
    pd.testing.assert_frame_equal(tables["spend_p_positive"][0], expected)
    assert tables["spend_p_positive"][1] == POSITIVE_SHARE_AXES and tables["click"][1] == RELIABILITY_AXES["binary"]


def test_the_spend_example_runs():

    done = run_example("spend_ziln.py", "--seeds", "1", "--rows", "1500", "--types", "ziln")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "decile_error" in done.stdout and "ziln" in done.stdout
