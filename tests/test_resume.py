"""Training interrupted after some epochs resumes from its state file with exactly the numbers of an
uninterrupted run (CPU), whatever the weighting, schedule and early-stopping state."""

import pytest
import torch

from mtlkit import ConfigError, DataError
from mtlkit.data import make_synthetic
from mtlkit.models import build_model
from mtlkit.training import Trainer, TrainerConfig


class Interrupted(Exception):
    pass


def _splits():
    data = make_synthetic(correlation=0.5, num_rows=900, input_dim=12, num_sine_terms=1, seed=0)
    return data.tasks, data.to_tensors().split([0.8, 0.2], seed=0)


def _fit(tasks, train, valid, state_file=None, stop_at=None, model_name="mmoe", **options):
    torch.manual_seed(0)
    model = build_model(model_name, input_dim=12, tasks=tasks, **({"dropout": 0.1} if model_name != "esmm" else {}))
    config = TrainerConfig(max_epochs=6, batch_size=64, eval_every=7, patience=None, progress=False, **options)

    def interrupt(step):
        if step == stop_at:
            raise Interrupted

    trainer = Trainer(model, config)
    result = trainer.fit(train, valid, state_file=state_file, step_callback=interrupt if stop_at else None)
    return model, result, trainer


@pytest.mark.parametrize("options", [
    {},
    {"weighting": "dwa", "lr_schedule": "cosine", "warmup_steps": 5},
    {"weighting": "gradnorm", "model_name": "ple"},
    {"weighting": "uncertainty", "weight_decay": 1e-4},
    {"gradient_surgery": "pcgrad", "weighting": "dynamic", "weighting_options": {"gamma": 0.8}},
    {"weighting": "rlw", "weighting_options": {"seed": 3}},  # the weights' own generator continues its sequence
    {"gradient_surgery": "gradvac", "gradient_surgery_options": {"beta": 0.2}},  # its targets are saved and restored
    {"gradient_surgery": "gradvac", "gradient_surgery_options": {"beta": 0.2, "per_layer": True}},  # and per layer
    {"gradient_surgery": "db_mtl", "gradient_surgery_options": {"beta": 0.8}},  # its moving averages and step count too
    {"gradient_surgery": "metabalance", "gradient_surgery_options": {"main_task": "y2"},  # its averages of the layers' norms
     "gradient_surgery_scope": "shared"},
    {"gradient_surgery": "moco", "gradient_surgery_options": {"gamma": 0.3}},  # its tracked gradients, weights and step count
    # and the shared coordinates it was restricted to in the first step
    {"gradient_surgery": "db_mtl", "gradient_surgery_scope": "shared_fixed"},
    {"weighting": "famo", "weighting_options": {"learning_rate": 0.05}},  # its logits and their Adam moments
])
def test_an_interrupted_run_resumes_to_the_same_numbers(tmp_path, options):
    tasks, (train, valid) = _splits()
    reference, expected, _ = _fit(tasks, train, valid, **options)
    state = tmp_path / "state.pt"
    with pytest.raises(Interrupted):  # 12 steps an epoch: stops in the fourth epoch, saved after the third
        _fit(tasks, train, valid, state_file=state, stop_at=40, **options)
    assert state.is_file()
    model, resumed, trainer = _fit(tasks, train, valid, state_file=state, **options)
    assert resumed.steps == expected.steps == 72
    assert resumed.history == expected.history
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)


def test_a_state_from_another_run_is_refused(tmp_path):
    tasks, (train, valid) = _splits()
    state = tmp_path / "state.pt"
    with pytest.raises(Interrupted):
        _fit(tasks, train, valid, state_file=state, stop_at=30)
    with pytest.raises(ConfigError, match=r"saved by a different run \(config differ.*training.learning_rate.: \(0.001, 0.01\)"):
        _fit(tasks, train, valid, state_file=state, learning_rate=0.01)
    with pytest.raises(ConfigError, match="train_rows"):
        _fit(tasks, valid, train, state_file=state)
    state.write_bytes(b"not a state")
    with pytest.raises(DataError, match="training state .* not readable"):
        _fit(tasks, train, valid, state_file=state)


def test_an_interrupted_command_line_run_resumes(tmp_path, monkeypatch):
    import yaml

    from in_process import run_cli
    from tables import SCHEMA, make_table

    make_table(600, seed=0).to_csv(tmp_path / "train.csv", index=False)
    config = {"data": {"train": "train.csv", "valid_fraction": 0.2},
              "schema": SCHEMA, "model": {"name": "mmoe", "num_experts": 3, "expert_hidden": [8], "tower_hidden": [4]},
              "training": {"max_epochs": 4, "batch_size": 64, "progress": False, "patience": None}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))

    def train(out, *extra):
        return run_cli("train", "--config", "run.yaml", "--out", out, *extra, cwd=tmp_path)

    assert train("straight").returncode == 0
    # Interrupted during its third epoch (8 steps an epoch): the state of epoch 2 stays beside the folder.
    fit = Trainer.fit

    def stop(step):
        if step == 20:
            raise SystemExit(3)

    monkeypatch.setattr(Trainer, "fit", lambda self, *a, **k: fit(self, *a, step_callback=stop, **k))
    done = train("resumed")
    assert done.returncode == 3, done.stdout + done.stderr
    monkeypatch.undo()
    state = tmp_path / ".resumed.training-state.pt"
    assert state.is_file() and not (tmp_path / "resumed").exists()
    done = train("resumed", "--resume")
    assert done.returncode == 0 and "resuming from" in done.stdout, done.stdout + done.stderr
    assert not state.exists()
    a, b = (torch.load(tmp_path / name / "model.pt", weights_only=True)["state_dict"] for name in ("straight", "resumed"))
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=0, atol=0)


def test_aitm_resumes_with_its_auxiliary_loss_in_the_history(tmp_path):
    from mtlkit.data import make_funnel

    # A second step that nearly always follows the first: the predictions often break the funnel.
    data = make_funnel(["click", "buy"], [0.5, 0.9], num_rows=900, input_dim=12, seed=0)
    train, valid = data.to_tensors().split([0.8, 0.2], seed=0)
    runs = []
    for state_file, stop_at in ((None, None), (tmp_path / "state.pt", 40), (tmp_path / "state.pt", None)):
        torch.manual_seed(2)  # an initialisation that starts against the funnel (seeds 0 and 5 never are)
        model = build_model("aitm", input_dim=12, tasks=data.tasks, bottom_hidden=[16, 8], calibration_weight=2.0)
        trainer = Trainer(model, TrainerConfig(max_epochs=6, batch_size=64, eval_every=7, patience=None, progress=False))

        def interrupt(step, stop_at=stop_at):
            if step == stop_at:
                raise Interrupted

        try:
            runs.append((model, trainer.fit(train, valid, state_file=state_file, step_callback=interrupt)))
        except Interrupted:
            pass
    (reference, expected), (model, resumed) = runs
    train_rows = [row for row in expected.history if row["split"] == "train"]
    assert all(row["auxiliary_loss"] >= 0 for row in train_rows)
    assert train_rows[0]["auxiliary_loss"] > 0.1 > 10 * train_rows[-1]["auxiliary_loss"]  # the calibrator trains it down
    assert train_rows[0]["auxiliary_loss"] == next(r for r in train_rows if r["task"] == "buy")["auxiliary_loss"]
    assert resumed.history == expected.history
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)
