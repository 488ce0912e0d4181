import pytest
import torch
import torch.nn.functional as F

from mtlkit import ConfigError
from mtlkit.experiments.tabular_run import RunConfig, train_run
from mtlkit.models import build_model, esmm_tasks
from mtlkit.models.esmm import probability_product_logit


def test_ctcvr_logit_is_the_product_of_probabilities():
    a = torch.linspace(-30, 30, 121, dtype=torch.float64)
    a, b = torch.meshgrid(a, a.flip(0), indexing="ij")
    logit = probability_product_logit(a, b)
    assert torch.isfinite(logit).all()
    expected = torch.sigmoid(a) * torch.sigmoid(b)
    torch.testing.assert_close(torch.sigmoid(logit), expected.clamp(max=1 - 1e-7), atol=1e-7, rtol=1e-6)


def test_bce_on_the_ctcvr_logit_equals_bce_on_the_product():
    a, b = torch.randn(100, dtype=torch.float64) * 3, torch.randn(100, dtype=torch.float64) * 3
    y = (torch.rand(100) < 0.2).double()
    ours = F.binary_cross_entropy_with_logits(probability_product_logit(a, b), y)
    reference = F.binary_cross_entropy(torch.sigmoid(a) * torch.sigmoid(b), y)
    torch.testing.assert_close(ours, reference)


def test_esmm_outputs_and_no_direct_cvr_loss():
    model = build_model("esmm", input_dim=12, tasks=esmm_tasks())
    out = model(torch.randn(5, 12))
    assert set(out) == {"ctr", "cvr", "ctcvr"} and all(v.shape == (5, 1) for v in out.values())
    assert {t.name: t.weight for t in model.tasks} == {"ctr": 1.0, "cvr": 0.0, "ctcvr": 1.0}
    with pytest.raises(ConfigError, match="exactly"):
        build_model("esmm", input_dim=12, tasks=["ctr", "cvr"])
    with pytest.raises(ConfigError, match="binary"):
        build_model("esmm", input_dim=12, tasks=[{"name": "ctr"}, {"name": "cvr", "type": "regression"}, {"name": "ctcvr"}])


def _ali_ccp_config(shared_data, model):
    folder = shared_data / "ali_ccp_sample"
    categorical = ["101", "121", "122", "124", "125", "126", "127", "128", "129", "205", "206", "207", "210",
                   "216", "508", "509", "702", "853", "301", "109_14", "110_14", "127_14", "150_14"]
    return RunConfig(
        data={"train": str(folder / "ali_ccp_train_sample.csv"), "valid": str(folder / "ali_ccp_val_sample.csv"),
              "test": str(folder / "ali_ccp_test_sample.csv")},
        schema={"tasks": [{"name": "ctr", "label": "click"},
                          {"name": "cvr", "label": "purchase", "weight": 0.0, "sample_space": "click"},
                          {"name": "ctcvr", "label": "purchase"}],
                "dense": ["D109_14", "D110_14", "D127_14", "D150_14", "D508", "D509", "D702", "D853"],
                "categorical": categorical, "default_embedding_dim": 18},
        model=model, training={"max_epochs": 3, "batch_size": 32, "progress": False})


def test_esmm_on_the_ali_ccp_sample(shared_data, tmp_path):
    import json

    run = train_run(_ali_ccp_config(shared_data, {"name": "esmm", "tower_hidden": [64, 32]}), tmp_path / "run")
    metrics = json.loads((run / "metrics.json").read_text())
    # CVR is scored on clicked rows only (2 clicks in the test file); CTR and CTCVR on all 50.
    assert metrics["test"]["cvr"]["count"] == 2
    assert metrics["test"]["ctr"]["count"] == metrics["test"]["ctcvr"]["count"] == 50
    assert 0.0 <= metrics["test"]["ctr"]["auc"] <= 1.0


def test_mmoe_on_the_aliexpress_sample(shared_data, tmp_path):
    import json

    folder = shared_data / "aliexpress_sample"
    config = RunConfig(
        data={"train": str(folder / "aliexpress_train_sample.csv"), "test": str(folder / "aliexpress_test_sample.csv"),
              "valid_fraction": 0.2},
        schema={"tasks": ["click", "conversion"], "dense": [f"numerical_{i}" for i in range(1, 64)],
                "categorical": [f"categorical_{i}" for i in range(1, 17)], "group_column": "search_id"},
        model={"name": "mmoe", "num_experts": 4, "expert_hidden": [32]},
        training={"max_epochs": 3, "batch_size": 16, "progress": False})
    run = train_run(config, tmp_path / "run")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["rows"] == {"train": 80, "valid": 20, "test": 20}
    assert "gauc" in metrics["test"]["click"]  # grouped by search_id


def test_esmm_on_the_aliexpress_sample(shared_data, tmp_path):
    import json

    folder = shared_data / "aliexpress_sample"
    config = RunConfig(
        data={"train": str(folder / "aliexpress_train_sample.csv"), "test": str(folder / "aliexpress_test_sample.csv"),
              "valid_fraction": 0.2},
        schema={"tasks": [{"name": "ctr", "label": "click"},
                          {"name": "cvr", "label": "conversion", "weight": 0.0, "sample_space": "click"},
                          {"name": "ctcvr", "label": "conversion"}],
                "dense": [f"numerical_{i}" for i in range(1, 64)],
                "categorical": [f"categorical_{i}" for i in range(1, 17)]},
        model={"name": "esmm", "tower_hidden": [32]}, training={"max_epochs": 2, "batch_size": 16, "progress": False})
    metrics = json.loads((train_run(config, tmp_path / "run") / "metrics.json").read_text())
    assert metrics["test"]["cvr"]["count"] == 10  # the 10 clicked rows of the 20 test rows
    assert metrics["test"]["ctcvr"]["count"] == 20


def test_the_funnel_chain_with_two_steps_is_esmm():
    from mtlkit import TaskSpec

    torch.manual_seed(0)
    esmm = build_model("esmm", input_dim=6, tasks=esmm_tasks(), tower_hidden=[8])
    funnel = build_model("esmm_funnel", input_dim=6, tasks=[TaskSpec("ctr"), TaskSpec("ctcvr")], tower_hidden=[8])
    funnel.load_state_dict(esmm.state_dict())  # the same stacked towers: CTR's network, then CVR's
    x = torch.randn(32, 6)
    expected, outputs = esmm(x), funnel(x)
    torch.testing.assert_close(outputs["ctr"], expected["ctr"])
    torch.testing.assert_close(outputs["ctcvr"], expected["ctcvr"])
    torch.testing.assert_close(funnel.conditional_logits(x)["ctcvr"], expected["cvr"])


def test_the_funnel_chain_never_predicts_against_the_funnel():
    from mtlkit import ConfigError, TaskSpec
    from mtlkit.data import make_funnel
    from mtlkit.training import Trainer, TrainerConfig

    data = make_funnel(["click", "cart", "buy"], [0.5, 0.9, 0.9], num_rows=6000, input_dim=8, seed=0)
    train, test = data.to_tensors().split([0.8, 0.2], seed=0)
    torch.manual_seed(0)
    model = build_model("esmm_funnel", input_dim=8, tasks=data.tasks, tower_hidden=[32, 16])
    result = Trainer(model, TrainerConfig(max_epochs=4, batch_size=128, progress=False, patience=None)).fit(train, test)
    predicted = torch.stack(list(model.predict(test.inputs).values()), dim=1)
    assert (predicted[:, 1:] <= predicted[:, :-1]).all()
    assert all(s["auc"] > 0.55 for s in result.final("valid").values())  # AITM on the same data: 0.57-0.59
    with pytest.raises(ConfigError, match="esmm_funnel: every step must be a binary task, not \\['spend'\\]"):
        build_model("esmm_funnel", input_dim=8, tasks=[TaskSpec("click"), TaskSpec("spend", "regression")])
