"""Post-hoc calibration of binary tasks (Platt scaling, isotonic regression): the fits, and a run that
predicts, evaluates and exports with them."""

import json

import pandas as pd
import pytest
import torch
import yaml

from mtlkit import ConfigError, DataError
from mtlkit.experiments.tabular_run import calibrate_run, evaluate_run, load_run, load_run_config, train_run
from mtlkit.models import IsotonicCalibration
from mtlkit.training.output_calibration import fit_isotonic_calibration, fit_platt_scaling

from in_process import run_cli
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


def test_isotonic_calibration_fixes_what_no_sigmoid_can_and_interpolates_as_fitted():
    from sklearn.isotonic import IsotonicRegression

    def draw(seed, rows=40000):
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(rows, generator=g) * 2
        # True rates sigmoid(z)^3: monotone in the logit, but no sigmoid of an affine map of it.
        return logits, (torch.rand(rows, generator=g) < torch.sigmoid(logits) ** 3).float()

    logits, labels = draw(0)
    knots, probabilities = fit_isotonic_calibration(logits, labels)
    isotonic = IsotonicCalibration(knots, probabilities)
    scale, shift = fit_platt_scaling(logits, labels)
    held_out, truth = draw(1)

    def logloss(calibrated_logits):
        return torch.nn.functional.binary_cross_entropy_with_logits(calibrated_logits, truth).item()

    assert logloss(isotonic(held_out[:, None])[:, 0]) < logloss(scale * held_out + shift) - 0.002
    # Between and beyond the knots, the map is scikit-learn's own prediction (linear, then clipped).
    fitted = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(logits.double().numpy(), labels.double().numpy())
    probe = torch.cat([held_out, torch.tensor([-50.0, 50.0, knots[0], knots[-1]])])
    expected = torch.from_numpy(fitted.predict(probe.double().numpy())).clamp(1e-7, 1 - 1e-7)
    torch.testing.assert_close(torch.sigmoid(isotonic(probe[:, None].double())[:, 0]), expected, rtol=0, atol=1e-9)
    assert isotonic(probe[:, None]).dtype == torch.float32
    # Weights count like repeated rows, as for Platt scaling.
    weight = torch.ones(40000)
    weight[:5000] = 2
    doubled = fit_isotonic_calibration(torch.cat([logits, logits[:5000]]), torch.cat([labels, labels[:5000]]))
    weighted = fit_isotonic_calibration(logits, labels, weight)
    assert weighted[0] == pytest.approx(doubled[0]) and weighted[1] == pytest.approx(doubled[1])
    with pytest.raises(DataError, match="isotonic calibration needs labelled rows of both classes"):
        fit_isotonic_calibration(logits[:10], torch.zeros(10))
    with pytest.raises(ValueError, match="non-decreasing probabilities"):
        IsotonicCalibration([0.0, 1.0], [0.6, 0.4])
    torch.testing.assert_close(IsotonicCalibration([0.0], [0.25])(torch.randn(3, 1)), torch.logit(torch.full((3, 1), 0.25)))


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
    done = run_cli("export", str(folder), "--out", str(files / "model.pt2"))
    assert done.returncode == 0, done.stdout + done.stderr
    program = torch.export.load(files / "model.pt2").module()
    inputs = dict(loaded.preprocessor.transform(frame, with_labels=False).tensors.inputs)
    torch.testing.assert_close(program(inputs)["click"], calibrated["click"], rtol=1e-5, atol=1e-6)


def test_an_isotonic_calibration_is_predicted_evaluated_and_exported(run):
    folder, files = run
    frame = pd.read_csv(files / "valid.csv")
    raw, _ = load_run(folder).predict(frame)
    result = calibrate_run(folder, files / "valid.csv", method="isotonic")
    saved = json.loads((folder / "calibration.json").read_text())
    assert saved["method"] == result["method"] == "isotonic" and set(saved["tasks"]) == {"click", "buy"}
    for task in ("click", "buy"):
        assert result["after"][task]["logloss"] < result["before"][task]["logloss"]
        assert result["after"][task]["calibration"] == pytest.approx(1.0, abs=1e-6)  # isotonic fits are mean-preserving
    loaded = load_run(folder)
    calibrated, _ = loaded.predict(frame)
    inputs = dict(loaded.preprocessor.transform(frame, with_labels=False).tensors.inputs)
    loaded.model.set_output_calibration(None)
    with torch.no_grad():
        logits = loaded.model(inputs)  # the model's own logits: a float32 probability's logit is too coarse on a steep step
    for task, fitted in saved["tasks"].items():
        mapped = IsotonicCalibration(fitted["logits"], fitted["probabilities"])(logits[task])[:, 0]
        torch.testing.assert_close(calibrated[task], torch.sigmoid(mapped), rtol=1e-5, atol=1e-6)
    loaded = load_run(folder)
    torch.testing.assert_close(calibrated["watch"], raw["watch"])
    assert evaluate_run(folder, files / "valid.csv")["metrics"]["buy"]["logloss"] == pytest.approx(result["after"]["buy"]["logloss"])
    done = run_cli("export", str(folder), "--out", str(files / "model.pt2"))
    assert done.returncode == 0, done.stdout + done.stderr
    program = torch.export.load(files / "model.pt2").module()
    # The exported graph's logits may differ from eager ones in the last bits (another kernel order), and a
    # steep step of the isotonic map magnifies that; the map is monotone, so bracket the logits instead.
    isotonic = IsotonicCalibration(saved["tasks"]["click"]["logits"], saved["tasks"]["click"]["probabilities"])
    slack = 1e-5 * logits["click"].abs() + 1e-6
    low, high = (torch.sigmoid(isotonic(logits["click"] + sign * slack)[:, 0]) for sign in (-1, 1))
    exported = program(inputs)["click"]
    assert ((exported >= low - 1e-6) & (exported <= high + 1e-6)).all()
    assert (exported - calibrated["click"]).abs().median() < 1e-6  # and almost everywhere the same number
    # Back to Platt scaling: the file is replaced, not compounded.
    calibrate_run(folder, files / "valid.csv")
    assert json.loads((folder / "calibration.json").read_text())["method"] == "platt"
    with pytest.raises(ConfigError, match="calibration method: unknown 'beta'"):
        calibrate_run(folder, files / "valid.csv", method="beta")


def test_calibration_from_the_command_line_and_a_bad_file(run):
    folder, files = run
    for method in ("platt", "isotonic"):
        done = run_cli("calibrate", str(folder), "--data", str(files / "valid.csv"), "--method", method, columns=250)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "logloss before" in done.stdout and "AUC after" in done.stdout and "calibration.json" in done.stdout
        assert ("knots" in done.stdout) == (method == "isotonic")
    (folder / "calibration.json").write_text(json.dumps({"tasks": {"watch": {"scale": 1.0, "shift": 0.0}}}))
    with pytest.raises(DataError, match="calibration.json: not a calibration of this run's binary tasks"):
        load_run(folder)
