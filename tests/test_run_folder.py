import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from mtlkit import ConfigError, DataError
from mtlkit.data.readers import read_table
from mtlkit.experiments.tabular_run import evaluate_run, load_run, load_run_config, predict_run, train_run

from in_process import run_cli, run_example
from tables import SCHEMA, make_table


def mtlkit_process(*args, cwd=None):
    """``python -m mtlkit.cli ARGS`` in a process of its own (the other tests run the CLI in-process)."""
    return subprocess.run([sys.executable, "-m", "mtlkit.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture
def files(tmp_path):
    make_table(800, seed=0).to_csv(tmp_path / "train.csv", index=False)
    make_table(200, seed=1).to_parquet(tmp_path / "test.parquet", index=False)
    config = {"data": {"train": "train.csv", "test": "test.parquet", "valid_fraction": 0.2, "chunk_rows": 64},
              "schema": SCHEMA,
              "model": {"name": "mmoe", "num_experts": 3, "expert_hidden": [16], "tower_hidden": [8]},
              "training": {"max_epochs": 4, "batch_size": 64, "progress": False}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def test_train_evaluate_predict_from_the_command_line(files):
    done = mtlkit_process("train", "--config", str(files / "run.yaml"), "--out", str(files / "run"))
    assert done.returncode == 0, done.stdout + done.stderr
    run = files / "run"
    for name in ("config.yaml", "preprocessing.json", "model.pt", "metrics.json", "history.csv", "learning_curves.png", "report.md",
                 "calibration.png"):
        assert (run / name).stat().st_size > 0, name
    assert "## calibration (test rows)" in (run / "report.md").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["test"]) == {"click", "buy", "watch"} and "mse" in metrics["test"]["watch"]
    assert metrics["test"]["click"]["auc"] > 0.6  # the table has real signal for clicks

    evaluated = evaluate_run(run, files / "test.parquet")
    assert evaluated["metrics"]["click"]["auc"] == pytest.approx(metrics["test"]["click"]["auc"])
    done = run_cli("evaluate", str(run), "--data", str(files / "test.parquet"))
    assert done.returncode == 0 and "click" in done.stdout
    # One row per metric, one column per task: every value whole within a log's 80 columns.
    for task, metric in (("click", "auc"), ("buy", "ne"), ("watch", "mse")):
        assert f"{evaluated['metrics'][task][metric]:.4f}" in done.stdout, done.stdout
    assert max(len(line) for line in done.stdout.splitlines()) <= 80

    done = run_cli("predict", str(run), "--data", str(files / "test.parquet"), "--out", str(files / "p.csv"), "--keep", "user")
    assert done.returncode == 0, done.stdout + done.stderr
    predictions = pd.read_csv(files / "p.csv")
    assert list(predictions.columns) == ["user", "click", "buy", "watch"] and len(predictions) == 200
    assert predictions["click"].between(0, 1).all()
    # Streaming in chunks of 64 rows gives the same numbers as one pass over all rows.
    direct, _ = load_run(run).predict(pd.read_parquet(files / "test.parquet"))
    for task in ("click", "buy", "watch"):
        torch.testing.assert_close(torch.tensor(predictions[task].to_numpy(), dtype=torch.float32), direct[task], atol=1e-5, rtol=1e-6)
    predict_run(run, files / "test.parquet", files / "p.parquet")
    assert pd.read_parquet(files / "p.parquet")["watch"].notna().all()
    done = run_cli("predict", str(run), "--data", str(files / "test.parquet"), "--out", str(files / "q.csv"), "--keep", "user,click")
    assert done.returncode == 2 and "--keep: ['click'] would overwrite" in done.stdout.replace("\n", "")
    assert not (files / "q.csv").exists() and not [p for p in files.iterdir() if p.name.startswith(".q.csv")]


def test_init_config_then_train(files):
    done = run_cli("init-config", "--data", str(files / "train.csv"), "--labels", "click,buy", "--out", str(files / "start.yaml"))
    assert done.returncode == 0, done.stdout + done.stderr
    config = load_run_config(files / "start.yaml")
    assert [t.name for t in config.schema.tasks] == ["click", "buy"]
    config.training.max_epochs, config.training.progress = 1, False
    assert (train_run(config, files / "from-init") / "model.pt").exists()
    again = run_cli("init-config", "--data", str(files / "train.csv"), "--labels", "click", "--out", str(files / "start.yaml"))
    assert again.returncode == 2 and "exists" in again.stdout


def test_init_config_leaves_out_identifiers_and_ignored_columns(files):
    table = make_table(300, seed=2)
    table.insert(0, "order_id", range(5000, 5300))
    table.to_csv(files / "orders.csv", index=False)
    done = run_cli("init-config", "--data", str(files / "orders.csv"), "--labels", "click", "--ignore", "city, buy",
                  "--out", str(files / "orders.yaml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "left out 'order_id'" in " ".join(done.stdout.split())
    schema = load_run_config(files / "orders.yaml").schema
    features = {c.name for c in [*schema.dense, *schema.categorical, *schema.multi_valued]}
    assert features == {"user", "price", "age", "tags", "watch_time"}
    unknown = run_cli("init-config", "--data", str(files / "orders.csv"), "--labels", "click", "--ignore", "colour",
                     "--out", str(files / "other.yaml"))
    assert unknown.returncode == 2 and "colour" in unknown.stdout and not (files / "other.yaml").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["training"].update(learnin_rate=0.1), "learnin_rate"),
    (lambda c: c["model"].update(num_experts=0), "num_experts"),
    (lambda c: c["model"].update(name="transformer"), "transformer"),
    (lambda c: c["schema"]["dense"].append("colour"), r"missing column.*colour"),
    (lambda c: c.update(optimiser="sgd"), "optimiser"),
    (lambda c: c["data"].update(train="nowhere.csv"), "no such file"),
    (lambda c: c["training"].update(gradient_surgery="metabalance", gradient_surgery_scope="shared",
                                    gradient_surgery_options={"main_task": "purchase"}), r"main_task: 'purchase' is not a task"),
])
def test_bad_configs_fail_before_training_and_leave_nothing(files, edit, message):
    config = yaml.safe_load((files / "run.yaml").read_text())
    edit(config)
    (files / "bad.yaml").write_text(yaml.safe_dump(config))
    done = run_cli("train", "--config", str(files / "bad.yaml"), "--out", str(files / "bad-run"))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "error" in done.stdout and __import__("re").search(message, done.stdout.replace("\n", ""))
    assert not (files / "bad-run").exists()
    assert not [p for p in files.iterdir() if p.name.startswith(".bad-run")]


@pytest.mark.parametrize("standardize", [True, False])
def test_a_regression_label_in_seconds(files, standardize):
    """Watch time in seconds around 20,000: trained standardised, the model predicts on the label's
    scale; trained raw, its outputs start 20,000 away and a few dozen Adam steps cannot get there."""
    for name, rows, seed in (("train.csv", 800, 0), ("test.csv", 200, 1)):
        table = make_table(rows, seed=seed)
        table.assign(watch_time=20_000 + 600 * table["watch_time"]).to_csv(files / name, index=False)
    config = load_run_config(files / "run.yaml")
    config.data.test = str(files / "test.csv")
    config.schema.standardize_labels = standardize
    config.training.max_epochs = 8
    run = train_run(config, files / "run")
    metrics = json.loads((run / "metrics.json").read_text())
    labels = pd.read_csv(files / "test.csv")["watch_time"]
    predict_run(run, files / "test.csv", files / "p.csv")
    predicted = pd.read_csv(files / "p.csv")["watch"][labels.notna()]
    labels = labels.dropna()
    # Metrics and predictions are in seconds either way, and agree with each other.
    assert metrics["test"]["watch"]["mse"] == pytest.approx(((predicted - labels) ** 2).mean(), rel=1e-4)
    assert metrics["test"]["watch"]["mae"] == pytest.approx((predicted - labels).abs().mean(), rel=1e-4)
    variance = labels.var(ddof=0)
    if standardize:
        stats = metrics["standardized_labels"]["watch"]
        assert 20_000 < stats["mean"] < 21_000 and 100 < stats["std"] < 1_000  # watch is defined on clicks, score > 0
        assert metrics["test"]["watch"]["mse"] < 2 * variance  # about the variance after 80 steps
        assert metrics["test"]["watch"]["loss"] == pytest.approx(metrics["test"]["watch"]["mse"] / stats["std"] ** 2, rel=1e-4)
        assert "standardised" in (run / "report.md").read_text()
    else:
        assert "standardized_labels" not in metrics
        assert metrics["test"]["watch"]["mse"] > 100 * variance
        assert metrics["test"]["watch"]["loss"] == pytest.approx(metrics["test"]["watch"]["mse"], rel=1e-4)


def _train_with_a_multiclass_task(files, add_label, task):
    """Train the fixture's run on tables given a multiclass label column by ``add_label``, with the
    tasks click and ``task``; returns the config (as plain data) and the run folder."""
    add_label(make_table(800, seed=0)).to_csv(files / "train.csv", index=False)
    add_label(make_table(200, seed=1)).to_parquet(files / "test.parquet", index=False)
    config = yaml.safe_load((files / "run.yaml").read_text())
    config["schema"]["tasks"] = [{"name": "click"}, task]
    config["training"].update(max_epochs=40, learning_rate=0.01, patience=None)
    (files / "run.yaml").write_text(yaml.safe_dump(config))
    return config, train_run(load_run_config(files / "run.yaml"), files / "run")


def test_a_multiclass_task_from_a_table(files):
    """A class index per row (0 Paris, 1 Lyon, 2 elsewhere; missing on some rows) trained beside a click:
    scored by accuracy and log loss, predicted as the most likely class and each class's probability."""
    def with_segment(table):
        segment = np.select([table["city"] == "paris", table["city"] == "lyon"], [0, 1], 2).astype(float)
        segment[::9] = np.nan
        return table.assign(segment=segment)

    _, run = _train_with_a_multiclass_task(files, with_segment, {"name": "segment", "type": "multiclass", "num_classes": 3})
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["test"]["segment"]) == {"loss", "count", "accuracy", "logloss"}
    assert metrics["test"]["segment"]["accuracy"] > 0.9 and metrics["test"]["segment"]["count"] == 200 - 23
    predict_run(run, files / "test.parquet", files / "p.csv")
    predicted = pd.read_csv(files / "p.csv")
    assert list(predicted.columns) == ["click", "segment", "segment_p_0", "segment_p_1", "segment_p_2"]
    probabilities = predicted[["segment_p_0", "segment_p_1", "segment_p_2"]].to_numpy()
    np.testing.assert_allclose(probabilities.sum(1), 1, atol=1e-5)
    assert (predicted["segment"].to_numpy() == probabilities.argmax(1)).all()
    labels = pd.read_parquet(files / "test.parquet")["segment"]
    hits = (predicted["segment"][labels.notna()] == labels.dropna()).mean()
    assert hits == pytest.approx(metrics["test"]["segment"]["accuracy"])
    # A class index the task does not have is an error naming the column.
    with_segment(make_table(200, seed=1)).assign(segment=3).to_parquet(files / "test.parquet", index=False)
    with pytest.raises(DataError, match="'segment'.*num_classes 3"):
        evaluate_run(run, files / "test.parquet")


def test_multiclass_labels_by_name(files):
    """Class names become indices in sorted order; predictions name the class; a class the training
    rows never had, or a num_classes that does not match the names, is an error naming the column."""
    def with_region(table):
        return table.assign(region=table["city"].map({"paris": "north", "lyon": "south", "nice": "south", "NA": "east"}))

    config, run = _train_with_a_multiclass_task(files, with_region, {"name": "region", "type": "multiclass", "num_classes": 3})
    assert json.loads((run / "preprocessing.json").read_text())["label_classes"] == {"region": ["east", "north", "south"]}
    assert json.loads((run / "metrics.json").read_text())["test"]["region"]["accuracy"] > 0.9
    predict_run(run, files / "test.parquet", files / "p.parquet")
    predicted = pd.read_parquet(files / "p.parquet")
    assert list(predicted.columns) == ["click", "region", "region_p_east", "region_p_north", "region_p_south"]
    expected = with_region(make_table(200, seed=1))["region"]
    assert (predicted["region"] == expected).mean() > 0.9
    with_region(make_table(200, seed=1)).replace({"region": {"east": "west"}}).to_parquet(files / "odd.parquet", index=False)
    with pytest.raises(DataError, match="'region' holds 'west'.*classes \\['east', 'north', 'south'\\]"):
        evaluate_run(run, files / "odd.parquet")
    config["schema"]["tasks"][1]["num_classes"] = 4
    (files / "run.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(DataError, match="'region' holds 3 class names.*num_classes 4"):
        train_run(load_run_config(files / "run.yaml"), files / "run-4")


EXPORTED_MODELS = [{"name": "mmoe", "num_experts": 3, "expert_hidden": [16], "tower_hidden": [8]},
                   {"name": "ple", "num_levels": 2, "expert_hidden": [256, 128], "tower_hidden": [8]},
                   {"name": "aitm", "bottom_hidden": [16, 8]},
                   {"name": "ple", "gate_type": "dselect_k", "gate_top_k": 2, "gate_entropy_weight": 0.01},
                   {"name": "mmoe", "gate_type": "dselect_k", "gate_top_k": 2, "gate_conditioning": "task"},
                   {"name": "stem", "num_levels": 2, "expert_hidden": [16], "tower_hidden": [8]}]


def test_export_serves_the_runs_predictions_with_pytorch_alone(files):
    """Dense, categorical and multi-valued inputs, two binary tasks and a standardised regression
    task; small (the one-node CPU path) and large (fused) experts, AITM's chain of transfers,
    DSelect-k gates (conditioned on the row, and on the task only) and STEM's embedding views. Each program, loaded in a process
    that never imports mtlkit (one for all the models: a new interpreter costs seconds), gives
    LoadedRun.predict's numbers for any batch size."""
    frame = pd.read_parquet(files / "test.parquet")
    for i, model in enumerate(EXPORTED_MODELS):
        config = load_run_config(files / "run.yaml")
        config.model = model
        config.training.max_epochs = 1
        run = train_run(config, files / f"run{i}")
        done = run_cli("export", str(run), "--out", str(files / f"model{i}.pt2"))
        assert done.returncode == 0, done.stdout + done.stderr
        assert not [p for p in files.iterdir() if p.name.startswith(f".model{i}.pt2")]  # no temporary file left
        loaded = load_run(run)
        expected, _ = loaded.predict(frame)
        inputs = dict(loaded.preprocessor.transform(frame, with_labels=False).tensors.inputs)
        torch.save({"inputs": inputs, "expected": expected}, files / f"case{i}.pt")
        assert loaded.preprocessor.label_statistics["watch"]["std"] != 1.0  # the regression really was standardised
    script = (
        "import sys, torch\n"
        f"for i in range({len(EXPORTED_MODELS)}):\n"
        "    case = torch.load(f'case{i}.pt', weights_only=True)\n"
        "    program = torch.export.load(f'model{i}.pt2').module()\n"
        "    for rows in (len(case['inputs']['dense']), 1, 7):\n"
        "        out = program({k: v[:rows] for k, v in case['inputs'].items()})\n"
        "        assert set(out) == set(case['expected']), (i, out.keys())\n"
        "        for task, value in out.items():\n"
        "            torch.testing.assert_close(value, case['expected'][task][:rows], atol=1e-5, rtol=1e-5,\n"
        "                                       msg=lambda m: f'model {i}, {task}: {m}')\n"
        "    print('served', i)\n"
        "assert not any(name.startswith('mtlkit') for name in sys.modules)\n")
    served = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=files)
    assert served.returncode == 0, served.stdout + served.stderr
    assert served.stdout.split("\n")[:-1] == [f"served {i}" for i in range(len(EXPORTED_MODELS))]


def test_undefined_metrics_are_null_in_strict_json(files):
    """Validation rows of one class leave that task's AUC undefined: null in metrics.json (which
    strict JSON readers accept, unlike NaN) and n/a on the console."""
    table = make_table(800, seed=0)
    table.assign(buy=0).to_csv(files / "train.csv", index=False)
    config = yaml.safe_load((files / "run.yaml").read_text())
    del config["data"]["test"]
    (files / "run.yaml").write_text(yaml.safe_dump(config))
    done = run_cli("train", "--config", str(files / "run.yaml"), "--out", str(files / "run"))
    assert done.returncode == 0, done.stdout + done.stderr
    text = (files / "run" / "metrics.json").read_text()
    metrics = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in metrics.json"))
    assert metrics["valid"]["buy"]["auc"] is None and metrics["valid"]["click"]["auc"] > 0.5
    assert "n/a" in done.stdout


def test_the_label_scale_example_runs(tmp_path):
    done = run_example("label_scale.py", "--seeds", "1", "--rows", "3000")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "watch_mse_over_noise" in done.stdout and done.stdout.count("'standardize_labels': True") == 2


@pytest.mark.parametrize("mutate, message", [
    (lambda f: f.assign(click=f["click"].replace(0, 3)), "'click'.*{0, 1}"),
    (lambda f: f.assign(age=f["age"].astype(str).str.replace("4", "four")), "'age' must be numeric"),
    (lambda f: f.iloc[:0], "no rows"),
])
def test_bad_training_tables(files, mutate, message):
    mutate(make_table(300)).to_csv(files / "train.csv", index=False)
    config = load_run_config(files / "run.yaml")
    with pytest.raises(DataError, match=message):
        train_run(config, files / "run")
    assert not (files / "run").exists()


def test_config_values_overridden_from_the_command_line(files):
    config = load_run_config(files / "run.yaml", ["training.max_epochs=2", "model.expert_hidden=[8, 4]",
                                                  "training.lr_schedule=cosine", "schema.standardize_labels=false"])
    assert config.training.max_epochs == 2 and config.training.lr_schedule == "cosine"
    assert config.model["expert_hidden"] == [8, 4] and config.schema.standardize_labels is False
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_run_config(files / "run.yaml", ["training"])
    with pytest.raises(ConfigError, match="training.max_epochs is not a mapping"):
        load_run_config(files / "run.yaml", ["training.max_epochs.x=1"])
    with pytest.raises(ConfigError, match="lerning_rate"):  # validated like the file itself
        load_run_config(files / "run.yaml", ["training.lerning_rate=0.1"])
    done = run_cli("train", "--config", str(files / "run.yaml"), "--out", str(files / "run"), "--set", "training.max_epochs=1",
                  "--set", "model.name=shared_bottom", "--set", "model={name: shared_bottom, bottom_hidden: [8]}")
    assert done.returncode == 0, done.stdout + done.stderr
    saved = yaml.safe_load((files / "run" / "config.yaml").read_text())
    assert saved["model"] == {"name": "shared_bottom", "bottom_hidden": [8]} and saved["training"]["max_epochs"] == 1


def test_metabalance_from_the_command_line(files):
    done = run_cli("train", "--config", str(files / "run.yaml"), "--out", str(files / "run"), "--set", "training.max_epochs=1",
                   "--set", "training.gradient_surgery=metabalance", "--set", "training.gradient_surgery_scope=shared",
                   "--set", "training.gradient_surgery_options={main_task: click, relax_factor: 1.0}")
    assert done.returncode == 0, done.stdout + done.stderr
    saved = yaml.safe_load((files / "run" / "config.yaml").read_text())["training"]
    assert saved["gradient_surgery"] == "metabalance" and saved["gradient_surgery_options"] == {"main_task": "click", "relax_factor": 1.0}


def test_empty_config_file_and_bad_yaml(files):
    (files / "empty.yaml").write_text("")
    with pytest.raises(ConfigError, match="mapping"):
        load_run_config(files / "empty.yaml")
    (files / "broken.yaml").write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid"):
        load_run_config(files / "broken.yaml")


def test_toml_configs_are_read(files):
    (files / "run.toml").write_text(
        '[data]\ntrain = "train.csv"\n[schema]\ntasks = ["click"]\ndense = ["age"]\n'
        '[model]\nname = "shared_bottom"\nbottom_hidden = [8]\n[training]\nmax_epochs = 1\nprogress = false\n')
    config = load_run_config(files / "run.toml")
    assert config.model["name"] == "shared_bottom" and config.data.train.endswith("train.csv")


def test_mismatched_run_files_and_prediction_errors(files):
    config = load_run_config(files / "run.yaml")
    config.training.max_epochs = 1
    run = train_run(config, files / "run")
    with pytest.raises(ConfigError, match="exists"):
        train_run(config, files / "run")
    # A preprocessing file from another run (a different vocabulary) must not pair with this model.
    pre = json.loads((run / "preprocessing.json").read_text())
    pre["vocabularies"]["city"].append("berlin")
    (run / "preprocessing.json").write_text(json.dumps(pre))
    with pytest.raises(DataError, match="different runs"):
        load_run(run)
    pre["vocabularies"]["city"].pop()
    (run / "preprocessing.json").write_text(json.dumps(pre))
    bad = make_table(50).drop(columns=["price"])
    bad.to_csv(files / "nofeature.csv", index=False)
    with pytest.raises(DataError, match="price"):
        predict_run(run, files / "nofeature.csv", files / "out.csv")
    assert not (files / "out.csv").exists()
    assert not [p for p in files.iterdir() if p.name.startswith(".out.csv")]


def test_training_on_a_folder_of_parts_and_a_glob(files):
    frame = pd.read_csv(files / "train.csv", dtype=str, keep_default_na=False)
    (files / "parts").mkdir()
    frame.iloc[:500].to_csv(files / "parts" / "part-0.csv", index=False)
    frame.iloc[500:].to_csv(files / "parts" / "part-1.csv", index=False)
    config = load_run_config(files / "run.yaml", ["data.train=parts", "data.test=test*.parquet", "training.max_epochs=1"])
    run = train_run(config, files / "parts-run", progress=False)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["rows"] == {"train": 640, "valid": 160, "test": 200}


def test_metrics_count_rows_with_their_weight(files):
    for name, rows, seed in (("train.csv", 800, 0), ("test.csv", 200, 1)):
        table = make_table(rows, seed=seed)
        table.assign(w=np.where(table["click"] == 1, 1.0, 5.0)).to_csv(files / name, index=False)
    config = load_run_config(files / "run.yaml", ["data.test=test.csv", "schema.weight_column=w", "training.max_epochs=2"])
    run = train_run(config, files / "weighted", progress=False)
    metrics = json.loads((run / "metrics.json").read_text())
    test = read_table(files / "test.csv")  # as the run reads it: the city "NA" stays a city
    predicted, _ = load_run(run).predict(test)
    p, y, w = predicted["click"].double().numpy(), test["click"].astype(float).to_numpy(), test["w"].astype(float).to_numpy()
    assert metrics["test"]["click"]["calibration"] == pytest.approx((w * p).sum() / (w * y).sum(), rel=1e-5)
    assert "weight from column 'w'" in (run / "report.md").read_text()
