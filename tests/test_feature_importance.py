
import numpy as np
import pandas as pd
import pytest
import yaml

from mtlkit.experiments.tabular_run import importance_run, load_run_config, train_run

from in_process import run_cli


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """click depends on `ad` only, spend on `price` only; `noise` on nothing."""
    folder = tmp_path_factory.mktemp("importance")
    rng = np.random.default_rng(0)

    def table(rows):
        ad = rng.choice(["a", "b", "c", "d"], rows)
        price = rng.normal(size=rows)
        click = (rng.random(rows) < np.where(np.isin(ad, ["a", "b"]), 0.8, 0.2)).astype(int)
        return pd.DataFrame({"ad": ad, "price": price, "noise": rng.normal(size=rows), "click": click,
                             "spend": 2 * price + 0.1 * rng.normal(size=rows)})

    table(3000).to_csv(folder / "train.csv", index=False)
    table(800).to_csv(folder / "test.csv", index=False)
    config = {"data": {"train": "train.csv", "valid_fraction": 0.2},
              "schema": {"tasks": [{"name": "click"}, {"name": "spend", "type": "regression"}],
                         "dense": ["price", "noise"], "categorical": ["ad"]},
              "model": {"name": "mmoe", "num_experts": 4, "expert_hidden": [16], "tower_hidden": [8]},
              "training": {"max_epochs": 15, "batch_size": 128, "learning_rate": 0.01, "progress": False}}
    (folder / "run.yaml").write_text(yaml.safe_dump(config))
    config = load_run_config(folder / "run.yaml")
    config.data.train = str(folder / "train.csv")
    return train_run(config, folder / "run", progress=False), folder / "test.csv"


def test_each_task_relies_on_its_own_column(run):
    folder, test = run
    result = importance_run(folder, test, repeats=3, seed=1)
    assert result.metrics == {"click": "auc", "spend": "mse"}
    assert result.baseline["click"] > 0.7 and result.baseline["spend"] < 0.2
    mean = result.mean
    assert mean.loc["ad", "click"] > 0.15 and abs(mean.loc["ad", "spend"]) < 0.1   # AUC drop; MSE rise
    assert mean.loc["price", "spend"] > 3.0 and abs(mean.loc["price", "click"]) < 0.05
    assert abs(mean.loc["noise", "click"]) < 0.03 and abs(mean.loc["noise", "spend"]) < 0.1
    assert list(result.table().index)[-1] == "noise"
    again = importance_run(folder, test, repeats=3, seed=1)
    pd.testing.assert_frame_equal(again.mean, result.mean)  # same seed, same shuffles, same numbers


def test_importance_from_the_command_line(run, tmp_path):
    folder, test = run
    done = run_cli("importance", str(folder), "--data", str(test),
                   "--repeats", "2", "--rows", "500", "--out", str(tmp_path / "importance.csv"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "auc drop" in done.stdout and "mse rise" in done.stdout
    written = pd.read_csv(tmp_path / "importance.csv", index_col="column")
    assert set(written.index) == {"ad", "price", "noise"} and {"click", "click_std", "spend", "spend_std"} <= set(written.columns)


def test_runs_compared_side_by_side(run, tmp_path):
    from mtlkit import ConfigError, DataError
    from mtlkit.experiments.tabular_run import compare_runs

    folder, _ = run
    config = load_run_config(folder / "config.yaml", ["model={name: shared_bottom, bottom_hidden: [8], tower_hidden: [4]}"])
    other = train_run(config, tmp_path / "sb", progress=False)
    frame = compare_runs([folder, other], split="valid")
    assert list(frame["model"]) == ["mmoe", "shared_bottom"]
    assert {"click/auc", "click/logloss", "click/ne", "click/calibration", "spend/mse", "spend/mae"} <= set(frame.columns)
    with pytest.raises(DataError, match="no test scores"):
        compare_runs([folder], split="test")
    with pytest.raises(ConfigError, match="split"):
        compare_runs([folder], split="train")
    done = run_cli("compare", str(folder), str(other), "--split", "valid", "--out", str(tmp_path / "runs.csv"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "shared_bottom" in done.stdout and pd.read_csv(tmp_path / "runs.csv").shape[0] == 2
