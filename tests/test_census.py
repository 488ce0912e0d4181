import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.model_selection import train_test_split

from mtlkit import ConfigError
from mtlkit.data.census import census_schema, load_census, read_census_file, split_in_halves
from mtlkit.experiments.mmoe_census import CensusExperimentConfig, gbdt_baseline, run_mmoe_census
from mtlkit.features import TablePreprocessor


@pytest.fixture(scope="module")
def census(request):
    from conftest import SHARED_DATA

    folder = SHARED_DATA / "census_income_kdd"
    if not folder.is_dir():
        pytest.skip(f"census-income not found at {folder}")
    return folder, load_census(folder, group=1)


def test_raw_file_traps(census):
    folder, data = census
    train = data.train
    assert len(train) == 199_523 and len(data.valid) + len(data.test) == 99_762
    assert (train["hisp_origin"] == "NA").sum() == 874  # a real category, not a missing value
    assert train["income"].sum() == 12_382 and train["marital"].sum() == 86_485
    assert round(train["income"].corr(train["marital"]), 4) == -0.1782
    assert round(train["education"].corr(train["marital"]), 4) == -0.2400


def test_protocols_choose_the_inputs():
    paper = census_schema(1, "paper")
    features = set(paper.feature_names)
    assert not features & {"education", "marital_stat", "instance_weight", "income_50k"}
    assert len(paper.dense) == 7 and len(paper.categorical) == 31
    assert "education" in census_schema(1, "keep-education").feature_names
    assert [t.name for t in census_schema(2).tasks] == ["education", "marital"]
    with pytest.raises(ConfigError, match="group 1"):
        census_schema(2, "keep-education")
    with pytest.raises(ConfigError, match="group"):
        census_schema(3)


def test_validation_test_split_is_scikit_learns():
    rows = np.arange(1001)
    valid, test = split_in_halves(1001, seed=1)
    expected_valid, expected_test = train_test_split(rows, test_size=0.5, random_state=1)
    assert valid.tolist() == expected_valid.tolist() and test.tolist() == expected_test.tolist()


def test_gbdt_baseline_runs_on_a_sample(census):
    _, data = census
    train, test = data.train.sample(4000, random_state=0), data.test.sample(2000, random_state=0)
    pre = TablePreprocessor(data.schema).fit(train)
    scores = gbdt_baseline(pre.transform(train).tensors, pre.transform(test).tensors)
    assert scores["income"] > 0.85 and scores["marital"] > 0.95


def test_tiny_reproduction_writes_the_tables(census, tmp_path):
    folder, _ = census
    hyper = tmp_path / "hyper.yaml"
    hyper.write_text(
        "embedding_dim: 4\n"
        "training: {batch_size: 2048, max_steps: 15, max_epochs: null, eval_every: 5, patience: null}\n"
        "models:\n  shared_bottom: {bottom_hidden: [16], tower_hidden: [8]}\n"
        "  mmoe: {num_experts: 2, expert_hidden: [16], tower_hidden: [8]}\n")
    config = CensusExperimentConfig(data_dir=str(folder), seeds=2, models=("shared_bottom", "mmoe"), gbdt=False,
                                    hyperparameters=str(hyper))
    run_mmoe_census(config, tmp_path / "out")
    cached = list((tmp_path / "out" / "cache").glob("census-*.pt"))
    assert len(cached) == 1 and torch.load(cached[0], weights_only=True)["train"]["labels"].shape == (199_523, 2)
    # A second run reads the tensors from the cache: same numbers, without touching the raw files' parser.
    import mtlkit.data.census as census_module

    original = census_module.read_census_file
    census_module.read_census_file = lambda path: (_ for _ in ()).throw(AssertionError("raw file re-read"))
    try:
        again = CensusExperimentConfig(data_dir=str(folder), seeds=3, models=("shared_bottom",), gbdt=False,
                                       hyperparameters=str(hyper))
        run_mmoe_census(again, tmp_path / "out")
    finally:
        census_module.read_census_file = original
    table = pd.read_csv(tmp_path / "out" / "table.csv")
    assert table["model"].tolist() == ["shared_bottom"] and (table["runs"] == 3).all()
    assert table.loc[0, "paper_income_mean"] == 0.9295
    assert (0.5 < table["income_mean"]).all() and (table["income_mean"] <= 1).all()
    assert "0.9295" in (tmp_path / "out" / "table.md").read_text()
    assert (tmp_path / "out" / "auc.png").stat().st_size > 0
    with pytest.raises(ConfigError, match="other settings"):
        run_mmoe_census(CensusExperimentConfig(data_dir=str(folder), seeds=1, models=("mmoe",), gbdt=False,
                                               group=2, hyperparameters=str(hyper)), tmp_path / "out")


def test_unreadable_census_files(tmp_path):
    from mtlkit import DataError

    with pytest.raises(DataError, match="no such file"):
        read_census_file(tmp_path / "census-income.data.gz")
    (tmp_path / "bad.csv").write_text("1,2,3\n")
    with pytest.raises(DataError, match="42"):
        read_census_file(tmp_path / "bad.csv")


def test_prepare_census_and_the_example_config(census, tmp_path):
    from pathlib import Path

    from mtlkit.data.census import export_census
    from mtlkit.experiments.tabular_run import load_run_config, train_run

    folder, _ = census
    paths = export_census(folder, tmp_path / "data" / "census")
    assert [p.name for p in paths] == ["train.parquet", "valid.parquet", "test.parquet"]
    example = Path(__file__).resolve().parents[1] / "examples" / "census.yaml"
    config = load_run_config(example)
    assert [t.name for t in config.schema.tasks] == ["income", "marital"]
    for key in ("train", "valid", "test"):  # point the example at this test's files
        setattr(config.data, key, str(tmp_path / "data" / "census" / f"{key}.parquet"))
    config.training.max_steps, config.training.max_epochs, config.training.progress = 20, None, False
    run = train_run(config, tmp_path / "run")
    import json

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["rows"] == {"train": 199_523, "valid": 49_881, "test": 49_881}
    assert metrics["test"]["marital"]["auc"] > 0.9  # 20 steps already learn the easy task
