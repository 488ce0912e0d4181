import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from mtlkit import ConfigError
from mtlkit.data import MultiTaskTensors
from mtlkit.experiments.tabular_run import train_run
from mtlkit.models import build_model, doubly_robust_risk, esmm_tasks, inverse_propensity_risk
from mtlkit.training import Trainer, TrainerConfig

from in_process import run_example
from test_esmm import _ali_ccp_config


def _batch(rows=64, seed=0):
    """ESMM's three label columns in task order (ctr, cvr, ctcvr): the CVR label only on clicks."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 6, generator=g)
    click = (torch.rand(rows, generator=g) < 0.4).float()
    purchase = click * (torch.rand(rows, generator=g) < 0.5).float()
    labels = torch.stack([click, torch.where(click > 0, purchase, torch.nan), purchase], dim=1)
    return x, labels, ~torch.isnan(labels)


def test_the_risk_is_the_inverse_propensity_weighted_mean_over_all_rows():
    logit, conversion = torch.tensor([0.3, -1.0, 2.0, 0.5]), torch.tensor([1.0, 0.0, 1.0, 1.0])
    click, propensity = torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([0.5, 0.25, 0.1, 0.9])
    bce = F.binary_cross_entropy_with_logits(logit, conversion, reduction="none")
    expected = (bce[0] / 0.5 + bce[1] / 0.25) / 4  # unclicked rows add nothing but count in the mean
    torch.testing.assert_close(inverse_propensity_risk(logit, conversion, click, propensity), expected)
    weight = torch.tensor([2.0, 1.0, 1.0, 0.0])
    torch.testing.assert_close(inverse_propensity_risk(logit, conversion, click, propensity, weight),
                               (2 * bce[0] / 0.5 + bce[1] / 0.25) / 4)
    # An unclicked row's label may be anything, even missing.
    odd = torch.tensor([1.0, 0.0, torch.nan, 7.0])
    torch.testing.assert_close(inverse_propensity_risk(logit, odd, click, propensity), expected)


def test_the_risk_estimates_the_loss_as_if_every_row_were_clicked():
    g = torch.Generator().manual_seed(1)
    rows = 400_000
    score = torch.randn(rows, generator=g)
    propensity = torch.sigmoid(2 * score - 1.0)  # clicks are likelier where the score is high: a biased sample
    conversion = (torch.rand(rows, generator=g) < torch.sigmoid(2 * score)).float()
    click = (torch.rand(rows, generator=g) < propensity).float()
    logit = torch.full((rows,), -0.5)
    entire_space = F.binary_cross_entropy_with_logits(logit, conversion)
    clicked_only = F.binary_cross_entropy_with_logits(logit[click > 0], conversion[click > 0])
    estimate = inverse_propensity_risk(logit, conversion, click, propensity)
    assert abs(float(estimate - entire_space)) < 0.01
    assert abs(float(clicked_only - entire_space)) > 0.1  # what ESMM's CVR would see on clicks alone


def test_escm2_is_esmm_plus_the_counterfactual_risk():
    x, labels, mask = _batch()
    torch.manual_seed(0)
    esmm = build_model("esmm", input_dim=6, tasks=esmm_tasks(), tower_hidden=[8])
    model = build_model("escm2", input_dim=6, tasks=esmm_tasks(), tower_hidden=[8], counterfactual_weight=0.3,
                        propensity_floor=0.2)
    model.load_state_dict(esmm.state_dict())  # no parameter of its own
    outputs = model(x)
    for name, value in esmm(x).items():
        torch.testing.assert_close(outputs[name], value)
    ctr, cvr, ctcvr = (outputs[name].squeeze(-1) for name in ("ctr", "cvr", "ctcvr"))
    propensity = torch.sigmoid(ctr).clamp_min(0.2)
    expected = 0.3 * inverse_propensity_risk(cvr, labels[:, 2], labels[:, 0], propensity)
    torch.testing.assert_close(model.auxiliary_loss(outputs, labels, mask), expected)

    trainer = Trainer(model, TrainerConfig(progress=False))
    batch = MultiTaskTensors(x, labels, model.task_names).batches(64, shuffle=False).__iter__().__next__()
    total, losses = trainer.batch_objective(batch)
    torch.testing.assert_close(total, losses["ctr"] + losses["ctcvr"] + expected)

    with pytest.raises(ValueError, match="labels"):
        model.auxiliary_loss(outputs)
    assert build_model("escm2", input_dim=6, tasks=esmm_tasks(), counterfactual_weight=0).auxiliary_loss(outputs, labels, mask) is None


def test_the_risk_trains_the_cvr_network_only_and_reads_clicked_rows():
    x, labels, mask = _batch()
    torch.manual_seed(0)
    model = build_model("escm2", input_dim=6, tasks=esmm_tasks(), tower_hidden=[8])
    loss = model.auxiliary_loss(model(x), labels, mask)
    loss.backward()
    # The towers are one stacked MLP, stack 0 the CTR network and 1 the CVR network; the first layer
    # reads one shared input, so its weights are the two networks' side by side, (6, 2 x 8).
    for name, parameter in model.towers.named_parameters():
        grad = parameter.grad.view(6, 2, 8).transpose(0, 1) if name == "net.linears.0.weight" else parameter.grad
        assert grad[0].abs().max() == 0, name  # the propensity is detached
        assert grad[1].abs().max() > 0, name
    # A conversion label outside the clicks is never read; a row without its click label never counts.
    changed = labels.clone()
    changed[labels[:, 0] == 0, 2] = 1.0
    with torch.no_grad():
        outputs = model(x)
        base = model.auxiliary_loss(outputs, labels, mask)
        torch.testing.assert_close(model.auxiliary_loss(outputs, changed, mask), base)
        missing, missing_mask = labels.clone(), mask.clone()
        missing[0, 0], missing_mask[0, 0] = torch.nan, False
        keep = torch.arange(len(x)) != 0
        dropped = model.auxiliary_loss({k: v[keep] for k, v in outputs.items()}, labels[keep], mask[keep])
        torch.testing.assert_close(model.auxiliary_loss(outputs, missing, missing_mask), dropped)
        assert torch.isfinite(model.auxiliary_loss(outputs, missing, missing_mask))


def test_the_propensity_floor_caps_a_rows_weight():
    outputs = {"ctr": torch.tensor([[-20.0]]), "cvr": torch.tensor([[0.0]]), "ctcvr": torch.tensor([[-20.0]])}
    labels, mask = torch.tensor([[1.0, 1.0, 1.0]]), torch.ones(1, 3, dtype=torch.bool)
    model = build_model("escm2", input_dim=2, tasks=esmm_tasks(), counterfactual_weight=1.0, propensity_floor=0.05)
    torch.testing.assert_close(model.auxiliary_loss(outputs, labels, mask), torch.tensor(20 * 0.6931471805599453))


def test_the_doubly_robust_risk_is_unbiased_and_exact_with_a_perfect_imputation():
    """Over random clicks with known propensities the risk averages to the loss on every row's label,
    whatever the imputation; with an imputation equal to the labels every draw gives that loss."""
    g = torch.Generator().manual_seed(0)
    rows, draws = 40, 1000
    logit = 1.5 * torch.randn(rows, generator=g)
    conversion = (torch.rand(rows, generator=g) < 0.3).float()
    propensity = 0.1 + 0.8 * torch.rand(rows, generator=g)
    truth = F.binary_cross_entropy_with_logits(logit, conversion)
    clicks = (torch.rand(draws, rows, generator=g) < propensity).float()
    for imputation, exact in ((torch.randn(rows, generator=g), False), (30 * (2 * conversion - 1), True)):
        risks = torch.stack([doubly_robust_risk(logit, conversion, click, propensity, imputation)[0] for click in clicks])
        if exact:
            torch.testing.assert_close(risks, truth.expand(draws), atol=1e-5, rtol=0)
        else:
            assert risks.std() > 0.05 and abs(risks.mean() - truth) < 4 * risks.std() / draws ** 0.5
    # On clicked rows whose propensity is 1 it is the plain loss, and the imputation fits the errors.
    ones = torch.ones(rows)
    risk, imputation_loss = doubly_robust_risk(logit, conversion, ones, ones, torch.zeros(rows))
    torch.testing.assert_close(risk, truth)
    imputed_error = F.binary_cross_entropy_with_logits(logit, torch.full((rows,), 0.5), reduction="none")
    error = F.binary_cross_entropy_with_logits(logit, conversion, reduction="none")
    torch.testing.assert_close(imputation_loss, (error - imputed_error).square().mean())


def test_the_doubly_robust_risk_trains_the_cvr_network_and_its_loss_the_imputation():
    g = torch.Generator().manual_seed(1)
    logit, imputation = torch.randn(8, generator=g, requires_grad=True), torch.randn(8, generator=g, requires_grad=True)
    click = torch.tensor([1.0, 0, 1, 0, 0, 1, 0, 0])
    risk, imputation_loss = doubly_robust_risk(logit, torch.ones(8), click, torch.full((8,), 0.4), imputation)
    grad_logit, grad_imputation = torch.autograd.grad(risk, [logit, imputation], allow_unused=True, retain_graph=True)
    assert grad_imputation is None and (grad_logit != 0).all()  # unclicked rows too: towards their imputed conversion
    grad_logit, grad_imputation = torch.autograd.grad(imputation_loss, [logit, imputation], allow_unused=True)
    assert grad_logit is None and (grad_imputation[click > 0] != 0).all() and (grad_imputation[click == 0] == 0).all()


def test_escm2_dr_adds_an_imputation_network_that_only_trains():
    x, labels, mask = _batch()
    torch.manual_seed(0)
    ips = build_model("escm2", input_dim=6, tasks=esmm_tasks(), tower_hidden=[8])
    model = build_model("escm2", input_dim=6, tasks=esmm_tasks(), tower_hidden=[8], counterfactual_mode="dr",
                        counterfactual_weight=0.5, imputation_weight=2.0)
    assert not any(name.startswith("imputation") for name in ips.state_dict())
    missing = model.load_state_dict(ips.state_dict(), strict=False).missing_keys
    assert missing and all(name.startswith("imputation.") for name in missing)
    model.eval()
    with torch.no_grad():
        for name, value in model(x).items():  # predictions are ESMM's: the imputation never runs here
            torch.testing.assert_close(value, ips.eval()(x)[name])
    with pytest.raises(ValueError, match="dr"):
        model.auxiliary_loss(model(x), labels, mask)
    model.train()
    outputs = model(x)
    imputation_logit = model.imputation(x)["imputation"].squeeze(-1)
    loss = model.auxiliary_loss(outputs, labels, mask)
    click, conversion = labels[:, 0], labels[:, 2]
    propensity = torch.sigmoid(outputs["ctr"].squeeze(-1)).clamp_min(0.05)
    risk, fit = doubly_robust_risk(outputs["cvr"].squeeze(-1), conversion, click, propensity, imputation_logit)
    torch.testing.assert_close(loss, 0.5 * (risk + 2.0 * fit))
    loss.backward()
    ctr_grad = model.towers.net.linears[0].weight.grad.view(6, 2, 8)[:, 0]
    assert ctr_grad.abs().max() == 0  # the propensity is detached
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in model.imputation.parameters())
    with pytest.raises(ValueError, match="dr"):  # each training forward's imputation is taken once
        model.auxiliary_loss(outputs, labels, mask)
    with torch.no_grad():  # a look at the losses without training (FAMO's after its step) has no term
        assert model.auxiliary_loss(model(x), labels, mask) is None


def test_escm2_dr_trains_with_a_weighting_that_looks_again_after_its_step():
    x, labels, _ = _batch(rows=512, seed=4)
    data = MultiTaskTensors(x, labels, ["ctr", "cvr", "ctcvr"])
    torch.manual_seed(0)
    model = build_model("escm2", input_dim=6, tasks=esmm_tasks(), tower_hidden=[8], counterfactual_mode="dr")
    result = Trainer(model, TrainerConfig(max_epochs=2, batch_size=128, weighting="famo", progress=False)).fit(data)
    logged = [row["auxiliary_loss"] for row in result.history if row["split"] == "train" and row["task"] == "ctr"]
    assert result.steps == 8 and logged and all(value > 0 for value in logged)


@pytest.mark.parametrize("options, key", [({"counterfactual_weight": -0.1}, "counterfactual_weight"),
                                          ({"counterfactual_weight": float("nan")}, "counterfactual_weight"),
                                          ({"counterfactual_weight": True}, "counterfactual_weight"),
                                          ({"propensity_floor": 0.0}, "propensity_floor"),
                                          ({"propensity_floor": 1.5}, "propensity_floor"),
                                          ({"propensity_floor": "0.1"}, "propensity_floor"),
                                          ({"counterfactual_mode": "direct"}, "counterfactual_mode"),
                                          ({"counterfactual_mode": "dr", "imputation_weight": -1.0}, "imputation_weight"),
                                          ({"counterfactual_mode": "dr", "imputation_weight": 0}, "imputation_weight"),
                                          ({"counterfactual_mode": "dr", "counterfactual_weight": 0}, "counterfactual_weight")])
def test_invalid_settings_name_their_key(options, key):
    with pytest.raises(ConfigError, match=key):
        build_model("escm2", input_dim=4, tasks=esmm_tasks(), **options)
    with pytest.raises(ConfigError, match="exactly"):
        build_model("escm2", input_dim=4, tasks=["ctr", "cvr"])


@pytest.mark.parametrize("mode", ["ips", "dr"])
def test_training_lowers_the_loss(mode):
    x, labels, _ = _batch(rows=2048, seed=3)
    labels[:, 0] = (x[:, 0] > 0).float()  # clicks and conversions that the inputs tell
    labels[:, 2] = labels[:, 0] * (x[:, 1] > 0).float()
    labels[:, 1] = torch.where(labels[:, 0] > 0, labels[:, 2], torch.nan)
    data = MultiTaskTensors(x, labels, ["ctr", "cvr", "ctcvr"])
    torch.manual_seed(0)
    model = build_model("escm2", input_dim=6, tasks=esmm_tasks(), tower_hidden=[16], counterfactual_mode=mode)
    result = Trainer(model, TrainerConfig(max_epochs=8, batch_size=256, learning_rate=1e-2, progress=False)).fit(data, data)
    valid = {task: [row for row in result.history if row["split"] == "valid" and row["task"] == task] for task in ("ctr", "cvr")}
    assert valid["cvr"][-1]["auc"] > 0.9  # scored on the clicked rows; trained only by the counterfactual risk and CTCVR
    assert valid["ctr"][-1]["loss"] < 0.3  # from about log 2 = 0.69 untrained
    logged = [row["auxiliary_loss"] for row in result.history if row["split"] == "train" and row["task"] == "ctr"]
    assert logged and all(value > 0 for value in logged)


@pytest.mark.parametrize("mode", ["ips", "dr"])
def test_escm2_on_the_ali_ccp_sample(shared_data, tmp_path, mode):
    model = {"name": "escm2", "tower_hidden": [64, 32], "counterfactual_mode": mode}
    run = train_run(_ali_ccp_config(shared_data, model), tmp_path / "run")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["cvr"]["count"] == 2  # CVR scored on the 2 clicked test rows
    assert metrics["test"]["ctcvr"]["count"] == 50
    history = pd.read_csv(run / "history.csv")
    assert (history["auxiliary_loss"].dropna() > 0).any()


def test_the_counterfactual_example_runs():
    done = run_example("counterfactual_cvr.py", "--seeds", "1", "--rows", "3000", "--epochs", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "escm2 (weight 0.1)" in done.stdout and "escm2-dr (weight 1)" in done.stdout
    assert "seeds where the model beats ESMM" in done.stdout
