"""Post-hoc Platt scaling of binary tasks: the fit, and a run that predicts, evaluates and exports with it."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml

from mtlkit import DataError
from mtlkit.experiments.tabular_run import calibrate_run, evaluate_run, load_run, load_run_config, train_run
from mtlkit.training.output_calibration import fit_platt_scaling

from tables import SCHEMA, make_table


def test_platt_scaling_recovers_a_known_distortion():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20000, generator=g) * 2
    labels = (torch.rand(20000, generator=g) < torch.sigmoid(2 * logits - 1)).float()
    scale, shift = fit_platt_scaling(logits, labels)
    assert scale == pytest.approx(2.0, abs=0.1) and shift == pytest.approx(-1.0, abs=0.1)
    # A row of weight 2 counts as that row twice.
    weight = torch.ones(20000)
    weight[:5000] = 2
    doubled = fit_platt_scaling(torch.cat([logits, logits[:5000]]), torch.cat([labels, labels[:5000]]))
    assert fit_platt_scaling(logits, labels, weight) == pytest.approx(doubled, rel=1e-6)
    with pytest.raises(DataError, match="both classes"):
        fit_platt_scaling(logits[:10], torch.ones(10), where="task 'x'")


@pytest.fixture
def run(tmp_path):
    make_table(800, seed=0).to_csv(tmp_path / "train.csv", index=False)
    valid = make_table(300, seed=2)
    # Labels shifted after training: the model's click rates are now too high, a case for calibration.
    valid.loc[valid.index[::2], "click"] = 0
    valid.to_csv(tmp_path / "valid.csv", index=False)
    config = {"data": {"train": "train.csv", "valid_fraction": 0.2}, "schema": SCHEMA,
              "model": {"name": "mmoe", "num_experts": 3, "expert_hidden": [16], "tower_hidden": [8]},
              "training": {"max_epochs": 3, "batch_size": 64, "progress": False}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    return train_run(load_run_config(tmp_path / "run.yaml"), tmp_path / "run"), tmp_path


def test_a_calibrated_run_predicts_evaluates_and_exports_with_it(run):
    folder, files = run
    frame = pd.read_csv(files / "valid.csv")
    raw, _ = load_run(folder).predict(frame)
    before = evaluate_run(folder, files / "valid.csv")["metrics"]
    result = calibrate_run(folder, files / "valid.csv")
    saved = json.loads((folder / "calibration.json").read_text())
    assert set(saved["tasks"]) == {"click", "buy"} and saved["method"] == "platt" and saved["rows"] == 300
    assert result["before"]["click"]["logloss"] == pytest.approx(before["click"]["logloss"])
    for task in ("click", "buy"):
        assert result["after"][task]["logloss"] < result["before"][task]["logloss"]  # fitted to minimise it there
        assert result["after"][task]["auc"] == pytest.approx(result["before"][task]["auc"])  # monotone: same ranking
    assert abs(result["after"]["click"]["calibration"] - 1) < abs(result["before"]["click"]["calibration"] - 1)

    loaded = load_run(folder)
    calibrated, _ = loaded.predict(frame)
    for task, fitted in saved["tasks"].items():
        expected = torch.sigmoid(fitted["scale"] * torch.logit(raw[task].double()) + fitted["shift"]).float()
        torch.testing.assert_close(calibrated[task], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(calibrated["watch"], raw["watch"])  # regression tasks are left alone
    assert evaluate_run(folder, files / "valid.csv")["metrics"]["click"]["logloss"] == pytest.approx(result["after"]["click"]["logloss"])

    # Calibrating again fits the model's own logits, not the calibrated ones.
    again = calibrate_run(folder, files / "valid.csv")
    for task, fitted in result["tasks"].items():
        assert again["tasks"][task]["scale"] == pytest.approx(fitted["scale"])
        assert again["tasks"][task]["shift"] == pytest.approx(fitted["shift"])

    # The exported program carries it.
    done = subprocess.run([sys.executable, "-m", "mtlkit.cli", "export", str(folder), "--out", str(files / "model.pt2")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    program = torch.export.load(files / "model.pt2").module()
    inputs = dict(loaded.preprocessor.transform(frame, with_labels=False).tensors.inputs)
    torch.testing.assert_close(program(inputs)["click"], calibrated["click"], rtol=1e-5, atol=1e-6)


def test_calibration_from_the_command_line_and_a_bad_file(run):
    folder, files = run
    done = subprocess.run([sys.executable, "-m", "mtlkit.cli", "calibrate", str(folder), "--data", str(files / "valid.csv")],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "250"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "logloss before" in done.stdout and "calibration.json" in done.stdout
    (folder / "calibration.json").write_text(json.dumps({"tasks": {"watch": {"scale": 1.0, "shift": 0.0}}}))
    with pytest.raises(DataError, match="calibration.json: not a calibration of this run's binary tasks"):
        load_run(folder)
