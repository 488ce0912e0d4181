import json

import pandas as pd
import pytest
import yaml

from mtlkit import ConfigError
from mtlkit.experiments.sweep import parse_grid, run_sweep

from in_process import run_cli
from tables import SCHEMA, make_table


@pytest.fixture
def config(tmp_path):
    make_table(500, seed=0).to_csv(tmp_path / "train.csv", index=False)
    make_table(200, seed=1).to_csv(tmp_path / "test.csv", index=False)
    data = {"data": {"train": "train.csv", "test": "test.csv", "valid_fraction": 0.2},
            "schema": SCHEMA, "model": {"name": "mmoe", "num_experts": 2, "expert_hidden": [8], "tower_hidden": [4]},
            "training": {"max_epochs": 2, "batch_size": 64, "progress": False}, "seed": 7}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))
    return tmp_path / "run.yaml"


def test_grid_entries():
    assert parse_grid(["model.name=[mmoe, ple]", "training.learning_rate=0.01"]) == [
        ("model.name", ["mmoe", "ple"]), ("training.learning_rate", [0.01])]
    for bad, message in [("model.name", "KEY="), ("a.b=[]", "no values"), ("a..b=[1]", "dotted key")]:
        with pytest.raises(ConfigError, match=message):
            parse_grid([bad])
    with pytest.raises(ConfigError, match="given twice"):
        parse_grid(["a.b=1", "a.b=2"])


def test_a_sweep_trains_every_point_and_seed_and_resumes(config, tmp_path):
    out = tmp_path / "sweep"
    grid = ["model=[{name: mmoe, num_experts: 2, expert_hidden: [8], tower_hidden: [4]}, "
            "{name: shared_bottom, bottom_hidden: [8], tower_hidden: [4]}]"]
    summary = run_sweep(config, grid, out, seeds=2)
    assert len(summary) == 2 and list(summary["seeds"]) == [2, 2]
    runs = pd.read_csv(out / "runs.csv")
    assert sorted(runs["seed"]) == [7, 7, 8, 8]  # the config's seed, then the next
    assert {"click/auc", "watch/mse"} <= set(runs.columns)
    mmoe = runs[runs["point"] == 0]["click/auc"]
    assert summary.loc[0, "click/auc_mean"] == pytest.approx(mmoe.mean())
    assert summary.loc[0, "click/auc_std"] == pytest.approx(mmoe.std())
    assert json.loads((out / "point01-seed1" / "metrics.json").read_text())["model"] == "shared_bottom"
    assert "+-" in (out / "summary.md").read_text()

    finished = (out / "point00-seed0" / "model.pt").stat().st_mtime_ns
    run_sweep(config, grid, out, seeds=2)  # resumes: nothing is trained again
    assert (out / "point00-seed0" / "model.pt").stat().st_mtime_ns == finished
    with pytest.raises(ConfigError, match="holds another sweep"):
        run_sweep(config, grid, out, seeds=3)


def test_every_point_is_validated_before_any_training(config, tmp_path):
    with pytest.raises(ConfigError, match="num_experts"):
        run_sweep(config, ["model.num_experts=[2, 0]"], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_sweep_from_the_command_line(config, tmp_path):
    done = run_cli("sweep", "--config", str(config), "--grid",
                   "training.learning_rate=[0.001, 0.01]", "--seeds", "1", "--out", str(tmp_path / "s"),
                   "--set", "training.max_epochs=1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "training.learning_rate" in done.stdout and (tmp_path / "s" / "summary.csv").is_file()
