import itertools
import math

import pytest
import torch
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from mtlkit import ConfigError
from mtlkit.training import TrainerConfig
from mtlkit.training.metrics import accuracy, calibration, group_auc, log_loss, normalized_entropy, roc_auc


def brute_force_auc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_brute_force_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (300,), generator=g).float()  # many ties
    labels = torch.randint(0, 2, (300,), generator=g).float()
    expected = brute_force_auc(scores.tolist(), labels.tolist())
    assert roc_auc(scores, labels) == pytest.approx(expected, abs=1e-12)
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_is_nan_with_one_class():
    assert math.isnan(roc_auc(torch.rand(10), torch.ones(10)))


def test_log_loss_from_logits_matches_sklearn():
    logits = torch.randn(200) * 3
    labels = (torch.rand(200) < 0.3).float()
    assert log_loss(logits, labels) == pytest.approx(sk_log_loss(labels, torch.sigmoid(logits.double())), abs=1e-9)


def test_group_auc_weights_groups_by_size_and_skips_single_class_groups():
    scores = torch.tensor([0.1, 0.9, 0.8, 0.2, 0.3, 0.5, 0.5])
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 1.0])
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    # group 0: AUC 1 (2 rows); group 1: pos 0.2 vs neg 0.8, 0.3 -> 0 (3 rows); group 2 single class.
    assert group_auc(scores, labels, groups) == pytest.approx((1.0 * 2 + 0.0 * 3) / 5)


def test_multiclass_accuracy_and_log_loss_match_sklearn():
    from sklearn.metrics import accuracy_score

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 4, generator=g) * 2
    labels = torch.randint(0, 4, (300,), generator=g).float()
    probabilities = torch.softmax(logits.double(), 1).numpy()
    assert log_loss(logits, labels) == pytest.approx(sk_log_loss(labels, probabilities, labels=[0, 1, 2, 3]), abs=1e-9)
    assert accuracy(logits, labels) == pytest.approx(accuracy_score(labels, probabilities.argmax(1)), abs=1e-12)


def test_normalized_entropy_and_calibration():
    g = torch.Generator().manual_seed(1)
    labels = (torch.rand(500, generator=g) < 0.2).float()
    rate = labels.mean().item()
    # A model that predicts the base rate everywhere knows nothing: NE 1, calibration 1.
    base = torch.full((500,), math.log(rate / (1 - rate)))
    assert normalized_entropy(base, labels) == pytest.approx(1.0, abs=1e-6)
    assert calibration(base, labels) == pytest.approx(1.0, abs=1e-6)
    logits = torch.randn(500, generator=g) + 3 * (labels - 0.5)
    entropy = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    assert normalized_entropy(logits, labels) == pytest.approx(sk_log_loss(labels, torch.sigmoid(logits.double())) / entropy, abs=1e-9)
    assert normalized_entropy(logits, labels) < 1
    doubled = torch.logit(2 * torch.sigmoid(base.double()))  # every probability twice too high
    assert calibration(doubled, labels) == pytest.approx(2.0, abs=1e-6)
    assert math.isnan(normalized_entropy(logits, torch.ones(500))) and math.isnan(calibration(logits, torch.zeros(500)))
    with pytest.raises(ConfigError, match="best at 1"):
        TrainerConfig(monitor="click/calibration")
    TrainerConfig(monitor="click/ne")


def test_reliability_bins_compare_predicted_and_observed_rates():
    from mtlkit.reports.calibration import reliability_table

    g = torch.Generator().manual_seed(4)
    p = torch.rand(20000, generator=g) * 0.2
    y = (torch.rand(20000, generator=g) < p).float()  # calibrated by construction
    table = reliability_table(p, y, bins=10)
    assert list(table["rows"]) == [2000] * 10 and table["mean_predicted"].is_monotonic_increasing
    assert (table["observed_rate"] - table["mean_predicted"]).abs().max() < 0.02
    doubled = reliability_table(2 * p, y, bins=10)
    ratio = (doubled["mean_predicted"] / doubled["observed_rate"]).iloc[2:]  # bins with enough positives
    assert ((ratio > 1.6) & (ratio < 2.5)).all()


def test_weighted_metrics_match_sklearn():
    from sklearn.metrics import accuracy_score, mean_absolute_error, mean_poisson_deviance, mean_squared_error

    from mtlkit.training.metrics import METRICS

    g = torch.Generator().manual_seed(5)
    scores = torch.randint(0, 8, (400,), generator=g).double() / 4 - 1  # many ties
    labels = (torch.rand(400, generator=g) < torch.sigmoid(2 * scores)).double()
    weight = torch.rand(400, generator=g).double() * 3
    assert roc_auc(scores, labels, weight) == pytest.approx(roc_auc_score(labels, scores, sample_weight=weight), abs=1e-12)
    assert roc_auc(scores, labels, torch.ones(400)) == pytest.approx(roc_auc(scores, labels), abs=1e-12)
    probabilities = torch.sigmoid(scores)
    assert log_loss(scores, labels, weight) == pytest.approx(sk_log_loss(labels, probabilities, sample_weight=weight), abs=1e-9)
    rate = (weight * labels).sum() / weight.sum()
    entropy = -(rate * torch.log(rate) + (1 - rate) * torch.log(1 - rate)).item()
    assert normalized_entropy(scores, labels, weight) == pytest.approx(log_loss(scores, labels, weight) / entropy, rel=1e-12)
    assert calibration(scores, labels, weight) == pytest.approx(((weight * probabilities).sum() / (weight * labels).sum()).item())
    logits = torch.randn(400, 3, generator=g)
    classes = torch.randint(0, 3, (400,), generator=g).double()
    assert accuracy(logits, classes, weight) == pytest.approx(accuracy_score(classes, logits.argmax(1), sample_weight=weight))
    values, targets = torch.rand(400, generator=g) * 4, torch.poisson(torch.full((400,), 2.0), generator=g)
    for name, reference in (("mse", mean_squared_error), ("mae", mean_absolute_error), ("deviance", mean_poisson_deviance)):
        expected = reference(targets.numpy(), values.double().numpy(), sample_weight=weight.numpy())
        assert METRICS[name](values, targets, weight) == pytest.approx(expected, rel=1e-9)


def test_evaluation_weights_the_metrics_like_the_loss():
    """Negatives sampled at 20 % with weight 5: the weighted metrics are the full table's."""
    from mtlkit import TaskSpec
    from mtlkit.data import MultiTaskTensors
    from mtlkit.training import evaluate

    g = torch.Generator().manual_seed(6)
    x = torch.randn(20000, 1, generator=g)
    y = (torch.rand(20000, generator=g) < torch.sigmoid(2 * x[:, 0] - 2)).float()
    keep = (y == 1) | (torch.rand(20000, generator=g) < 0.2)
    weight = torch.where(y == 1, 1.0, 5.0)[keep]

    class Oracle(torch.nn.Module):
        tasks = (TaskSpec("click"),)

        def forward(self, inputs):
            return {"click": 2 * inputs - 2}

    full = evaluate(Oracle(), MultiTaskTensors(x, y[:, None], ["click"]), Oracle.tasks)["click"]
    sampled = MultiTaskTensors(x[keep], y[keep, None], ["click"], sample_weight=weight)
    weighted = evaluate(Oracle(), sampled, Oracle.tasks)["click"]
    unweighted = evaluate(Oracle(), MultiTaskTensors(x[keep], y[keep, None], ["click"]), Oracle.tasks)["click"]
    assert weighted["calibration"] == pytest.approx(full["calibration"], abs=0.05)
    assert abs(unweighted["calibration"] - 1) > 0.3  # the sampled table's own rate is far higher
    assert weighted["logloss"] == pytest.approx(full["logloss"], rel=0.05)
