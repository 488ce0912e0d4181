"""The huber and poisson task types: their losses, metrics and what they buy over squared error."""

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
from mtlkit.training.metrics import poisson_deviance


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
    predicted = model.predict(x[5000:])["purchases"]
    assert (predicted > 0).all()
    constant = poisson_deviance(torch.full((1000,), counts[:5000].mean().item()), counts[5000:])
    truth = poisson_deviance(rate[5000:], counts[5000:])
    assert scores["deviance"] < truth + 0.3 * (constant - truth)  # most of the way from the mean to the true rates
    assert set(scores) == {"loss", "deviance", "mae", "count"}


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
