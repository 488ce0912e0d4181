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
