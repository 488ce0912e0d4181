import json
import subprocess
import sys

import pandas as pd
import pytest

from mtlkit.errors import ConfigError
from mtlkit.experiments.synthetic_sweep import (SyntheticSweepConfig, model_configs_at_equal_budget, mtl_gain, paired_comparisons,
                                               run_synthetic_sweep, sweep_profile)
from mtlkit.models import build_model

from in_process import run_cli

TINY = dict(correlations=(1.0, 0.1), models=("shared_bottom", "mmoe"), seeds=2, steps=40, eval_every=20,
            train_rows=600, valid_rows=100, test_rows=100, profile="tiny")


def test_sweep_writes_every_output_and_resumes(tmp_path):
    config = SyntheticSweepConfig(**TINY)
    result = run_synthetic_sweep(config, tmp_path)
    for name in ("sweep.json", "runs.jsonl", "summary.csv", "history.csv", "table.csv", "table.md",
                 "loss_curves.png", "final_loss_distribution.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert len(summary) == 2 * 2 * 2
    assert {"model", "correlation", "seed", "test_loss_y1", "test_loss_y2", "mean_loss", "parameters"} <= set(summary)
    history = pd.read_csv(tmp_path / "history.csv")
    assert set(history["split"]) == {"train", "valid", "test"} and set(history["step"]) == {20, 40}
    assert len(result["claims"]) == 2

    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    run_synthetic_sweep(config, tmp_path)  # nothing left to do
    assert (tmp_path / "runs.jsonl").read_text().splitlines() == lines

    # An interrupted run (half-written last line) is redone; growing the seeds only adds runs.
    (tmp_path / "runs.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:30])
    bigger = SyntheticSweepConfig(**{**TINY, "seeds": 3})
    run_synthetic_sweep(bigger, tmp_path, jobs=2)
    runs = []
    for line in (tmp_path / "runs.jsonl").read_text().splitlines():
        try:
            runs.append(json.loads(line))
        except json.JSONDecodeError:
            assert line == lines[-1][:30]
    assert len({(r["model"], r["correlation"], r["seed"]) for r in runs}) == 2 * 2 * 3


def test_mtl_gain_is_the_paired_single_task_loss_minus_the_models(tmp_path):
    config = SyntheticSweepConfig(**{**TINY, "models": ("single_task", "shared_bottom", "mmoe"), "correlations": (0.5,)})
    result = run_synthetic_sweep(config, tmp_path)
    summary, gain = result["summary"], result["mtl_gain"]
    assert (tmp_path / "mtl_gain.md").read_text().count("| 0.5 |") == 2
    assert (tmp_path / "mtl_gain.png").stat().st_size > 0
    single = summary[summary.model == "single_task"].set_index("seed")
    for model in ("shared_bottom", "mmoe"):
        runs = summary[summary.model == model].set_index("seed")
        row = gain[gain.model == model].iloc[0]
        for task in ("y1", "y2"):
            diff = single[f"test_loss_{task}"] - runs[f"test_loss_{task}"]
            assert row[f"gain_{task}"] == pytest.approx(diff.mean()) and row[f"gain_{task}_std"] == pytest.approx(diff.std())
        both = pd.concat([single[f"test_loss_{t}"] - runs[f"test_loss_{t}"] for t in ("y1", "y2")], axis=1)
        assert row["seesaw_runs"] == int(((both > 0).any(axis=1) & (both < 0).any(axis=1)).sum()) and row["runs"] == 2
    # A seesaw, constructed: one task gains, the other loses.
    made = pd.DataFrame({"model": ["single_task", "mmoe"], "correlation": [1.0, 1.0], "seed": [0, 0],
                         "test_loss_y1": [0.5, 0.4], "test_loss_y2": [0.5, 0.6]})
    row = mtl_gain(made).iloc[0]
    assert row["gain_y1"] == pytest.approx(0.1) and row["gain_y2"] == pytest.approx(-0.1) and row["seesaw_runs"] == 1
    assert mtl_gain(made[made.model == "mmoe"]).empty  # no single-task runs: nothing to gain over


def test_sweep_refuses_to_mix_settings(tmp_path):
    run_synthetic_sweep(SyntheticSweepConfig(**{**TINY, "correlations": (0.5,), "seeds": 1}), tmp_path)
    with pytest.raises(ConfigError, match="steps"):
        run_synthetic_sweep(SyntheticSweepConfig(**{**TINY, "steps": 41}), tmp_path)


def test_same_seed_same_sweep(tmp_path):
    config = SyntheticSweepConfig(**{**TINY, "correlations": (0.5,), "seeds": 1})
    a = run_synthetic_sweep(config, tmp_path / "a")["summary"]
    b = run_synthetic_sweep(config, tmp_path / "b")["summary"]
    pd.testing.assert_frame_equal(a.drop(columns="seconds"), b.drop(columns="seconds"))


def test_models_are_compared_at_equal_budget():
    configs = model_configs_at_equal_budget(["single_task", "shared_bottom", "omoe", "mmoe", "cgc", "ple", "adatt"], 100, ["y1", "y2"])
    sizes = {name: build_model(name, cfg).count_parameters() for name, cfg in configs.items()}
    for name in ("single_task", "shared_bottom", "cgc", "ple", "adatt"):
        assert abs(sizes[name] - sizes["mmoe"]) / sizes["mmoe"] < 0.03, (name, sizes)
    assert configs["omoe"].expert_hidden == configs["mmoe"].expert_hidden  # same experts, one gate


def test_the_ple_setup_sizes_its_models_to_mmoe_with_the_papers_towers():
    config = sweep_profile("ple", "quick")
    assert config.correlations == (1.0, 0.75, 0.5, 0.4, 0.2) and config.batch_size == 256 and config.lr_schedule == "cosine"
    assert sweep_profile("ple", "paper").resolved_train_rows + 2 * 100_000 == pytest.approx(1_400_000, rel=0.001)
    configs = model_configs_at_equal_budget(config.models + ("adatt",), 512, ["y1", "y2"], setup="ple")
    models = {name: build_model(name, cfg) for name, cfg in configs.items()}
    sizes = {name: model.count_parameters() for name, model in models.items()}
    for name in ("single_task", "shared_bottom", "cgc", "ple", "adatt"):
        assert abs(sizes[name] - sizes["mmoe"]) / sizes["mmoe"] < 0.03, (name, sizes)
    assert all(tuple(cfg.tower_hidden) == (256, 128, 64) and cfg.input_dim == 512 for cfg in configs.values())
    assert configs["mmoe"].num_experts == 3 and configs["cgc"].num_shared_experts == configs["cgc"].num_task_experts == 1
    with pytest.raises(ConfigError, match="omoe"):  # the PLE paper has no OMoE; the set-up does not size one
        sweep_profile("ple", "quick", models=("omoe",))
    with pytest.raises(ConfigError, match="huge"):
        sweep_profile("ple", "huge")


def test_paired_comparisons_count_wins_run_by_run():
    summary = pd.DataFrame({"model": ["mmoe", "shared_bottom", "ple"] * 3, "correlation": [0.5] * 6 + [1.0] * 3,
                            "seed": [0, 0, 0, 1, 1, 1, 0, 0, 0],
                            "mean_loss": [0.1, 0.3, 0.05, 0.4, 0.2, 0.5, 0.1, 0.1, 0.2]})
    claims = paired_comparisons(summary, [("mmoe", "shared_bottom"), ("ple", "mmoe"), ("cgc", "mmoe")])
    by_key = {(c["model"], c["correlation"]): c for c in claims}
    assert set(by_key) == {("mmoe", 0.5), ("mmoe", 1.0), ("ple", 0.5), ("ple", 1.0)}  # no CGC runs: left out
    half = by_key["mmoe", 0.5]
    assert half["runs"] == 2 and half["model_wins"] == 1 and half["baseline"] == "shared_bottom"
    assert half["mean_gap"] == pytest.approx(((0.3 - 0.1) + (0.2 - 0.4)) / 2) and half["model_mean"] == pytest.approx(0.25)
    assert by_key["mmoe", 1.0]["model_wins"] == 0  # a tie is not a win
    assert by_key["ple", 0.5]["model_wins"] == 1 and by_key["ple", 1.0]["mean_gap"] == pytest.approx(-0.1)


def test_a_sweep_written_before_the_setups_existed_resumes(tmp_path):
    config = SyntheticSweepConfig(**{**TINY, "correlations": (0.5,), "seeds": 1})
    run_synthetic_sweep(config, tmp_path)
    settings = json.loads((tmp_path / "sweep.json").read_text())
    del settings["setup"], settings["lr_schedule"]  # fields added since; the sweep had their defaults
    settings["generator"] = "mmoe"  # how the file named the MMoE set-up before
    (tmp_path / "sweep.json").write_text(json.dumps(settings))
    lines = (tmp_path / "runs.jsonl").read_text()
    run_synthetic_sweep(config, tmp_path)
    assert (tmp_path / "runs.jsonl").read_text() == lines
    with pytest.raises(ConfigError, match="setup"):
        run_synthetic_sweep(SyntheticSweepConfig(**{**TINY, "setup": "ple", "models": ("mmoe",)}), tmp_path)


def test_invalid_sweep_settings():
    with pytest.raises(ConfigError, match="correlations"):
        SyntheticSweepConfig(correlations=(1.2,))
    with pytest.raises(ConfigError, match="models"):
        SyntheticSweepConfig(models=("mmoe", "transformer"))
    with pytest.raises(ConfigError, match="setup"):
        SyntheticSweepConfig(setup="aitm")
    with pytest.raises(ConfigError, match="lr_schedule"):
        SyntheticSweepConfig(lr_schedule="step")


def test_cli_runs_a_tiny_sweep_and_reports_errors(tmp_path):
    out = tmp_path / "cli"
    command = ["reproduce", "mmoe-synthetic", "--seeds", "1", "--steps", "20",
               "--correlations", "0.5", "--models", "shared_bottom,mmoe", "--out", str(out), "--jobs", "1"]
    done = run_cli(*command)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "MMoE" in done.stdout and (out / "loss_curves.png").exists()
    bad = run_cli(*command[:2], "--profile", "huge", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "quick" in bad.stdout
    # A process of its own: `python -m mtlkit.cli` reports a bad value with exit code 2, no traceback.
    bad = subprocess.run([sys.executable, "-m", "mtlkit.cli", *command[:2], "--correlations", "0.5,1.7", "--out", str(tmp_path / "y")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "correlation" in bad.stdout and "Traceback" not in bad.stdout + bad.stderr


def test_cli_runs_a_tiny_ple_sweep(tmp_path):
    out = tmp_path / "ple"
    done = run_cli("reproduce", "ple-synthetic", "--seeds", "1", "--steps", "20", "--correlations", "0.4",
                   "--models", "single_task,mmoe,ple", "--out", str(out), "--jobs", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PLE mean" in done.stdout and "below MMoE" in done.stdout and "seesaw" in done.stdout
    assert json.loads((out / "sweep.json").read_text())["setup"] == "ple"
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary["model"]) == {"single_task", "mmoe", "ple"} and (out / "mtl_gain.png").exists()
