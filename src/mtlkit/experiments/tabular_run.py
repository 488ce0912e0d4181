"""Train, evaluate and predict on one's own tables, with everything of a run kept in one folder.

A run folder holds: ``config.yaml`` (the resolved config), ``preprocessing.json`` (the fitted
preprocessing), ``model.pt`` (the best checkpoint), ``metrics.json``, ``history.csv``,
``learning_curves.png``, ``report.md``, ``calibration.png`` (binary, count and amount tasks) and, for mixtures of
experts, ``gate_usage.json`` and ``gate_usage.png`` (how the gates spread their weight over the
experts on the validation rows, :mod:`mtlkit.reports.gate_usage`). It is written into a temporary folder and renamed at the
end, so a failed run leaves nothing half-written behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import yaml

from mtlkit.configuration import from_mapping
from mtlkit.data.readers import iter_table, read_table, table_format
from mtlkit.data.schema import TableSchema, identifier_columns, infer_schema, is_funnel
from mtlkit.errors import ConfigError, DataError
from mtlkit.features import TablePreprocessor
from mtlkit.files import atomic_write, write_json, write_text
from mtlkit.models import IsotonicCalibration, TabularMultiTaskModel, apply_output_calibration, build_tabular_model, model_config
from mtlkit.reports.calibration import POSITIVE_SHARE_AXES, RELIABILITY_AXES, plot_reliability, reliability_table
from mtlkit.reports.feature_importance import FeatureImportance, permutation_importance
from mtlkit.reports.gate_usage import (
    GateUsage, GateUsageAccumulator, gate_usage_markdown, measure_gate_usage, measure_gate_usage_by_group, save_gate_usage,
)
from mtlkit.reports.plots import plot_learning_curves
from mtlkit.tasks import TaskSpec
from mtlkit.training import Trainer, TrainerConfig, evaluate, forward_outputs, load_checkpoint, save_checkpoint, score_outputs
from mtlkit.training.distributed import barrier, is_main_process
from mtlkit.training.output_calibration import fit_isotonic_calibration, fit_platt_scaling

__all__ = ["DataConfig", "RunConfig", "load_run_config", "train_run", "evaluate_run", "predict_run", "initial_config",
           "dump_config", "LoadedRun", "load_run", "calibrate_run", "gate_usage_run", "gate_usage_by_column_run", "training_state_path",
           "importance_run", "compare_runs"]


@dataclass
class DataConfig:
    """Where the rows come from (paths relative to the config file).

    Args:
        train: training table (CSV, CSV.gz or Parquet).
        valid: validation table; when absent, ``valid_fraction`` of the training rows (seeded).
        test: optional test table, scored once with the best weights.
        valid_fraction: share of training rows held out when ``valid`` is absent.
        chunk_rows: rows per chunk when reading and predicting.
    """

    train: str
    valid: str | None = None
    test: str | None = None
    valid_fraction: float = 0.1
    chunk_rows: int = 250_000

    def __post_init__(self) -> None:
        if not 0 < self.valid_fraction < 1:
            raise ConfigError(f"data.valid_fraction: expected a number in (0, 1), got {self.valid_fraction!r}")


@dataclass
class RunConfig:
    """A whole run: data, schema, model (``name`` plus its config fields) and training options."""

    data: DataConfig
    schema: TableSchema
    model: dict[str, Any] = field(default_factory=lambda: {"name": "mmoe"})
    training: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        self.data = from_mapping(DataConfig, self.data, "data")
        self.schema = TableSchema.from_dict(self.schema)
        self.training = self.training if isinstance(self.training, TrainerConfig) else TrainerConfig.from_dict(self.training or {})
        if not isinstance(self.model, Mapping) or "name" not in self.model:
            raise ConfigError("model: expected a mapping with a 'name' (one of the registered models) and its options")
        name = self.model["name"]
        reserved = sorted({"input_dim", "tasks"} & set(self.model))
        if reserved:
            raise ConfigError(f"model: {reserved} come from the schema and the encoder; remove them from the model section")
        # Validate the options now, before any data is read (input_dim is a placeholder here).
        model_config(name, {"input_dim": 1, "tasks": self.schema.tasks, **self.model_options})

    @property
    def model_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.model.items() if k != "name"}

    def to_dict(self) -> dict[str, Any]:
        return {"data": dict(self.data.__dict__), "schema": self.schema.to_dict(), "model": dict(self.model),
                "training": self.training.to_dict(), "seed": self.seed}


def _read_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            return tomllib.loads(text)
        data = yaml.safe_load(text)
    except Exception as error:  # YAML and TOML parsers raise their own types
        raise ConfigError(f"{path}: not valid {path.suffix.lstrip('.').upper() or 'YAML'} ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_run_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> RunConfig:
    """Read and validate a YAML or TOML run config; data paths become relative to its folder.

    ``overrides`` are ``"section.key=value"`` strings (``"training.max_epochs=5"``, ``"model.name=ple"``,
    ``"model.expert_hidden=[64, 32]"``), each value read as YAML, applied before validation.
    """
    path = Path(path)
    data = _read_mapping(path)
    for override in overrides:
        _override(data, override)
    config = from_mapping(RunConfig, data, str(path))
    for key in ("train", "valid", "test"):
        value = getattr(config.data, key)
        if value is not None and not Path(value).is_absolute():
            setattr(config.data, key, str((path.parent / value).resolve()))
    return config


def _override(data: dict[str, Any], override: str) -> None:
    """Set ``data[a][b] = value`` for ``"a.b=value"`` (the value read as YAML), in place."""
    key, sep, text = override.partition("=")
    keys = key.strip().split(".")
    if not sep or not all(keys):
        raise ConfigError(f"--set: expected KEY=VALUE with a dotted key (training.max_epochs=5), got {override!r}")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {key}: not a YAML value ({error})") from None
    node = data
    for depth, part in enumerate(keys[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {'.'.join(keys[:depth + 1])} is not a mapping")
    node[keys[-1]] = value


def training_state_path(out_dir: str | os.PathLike) -> Path:
    """Where :func:`train_run` keeps the state of an unfinished run: beside the run folder, which only
    appears once training is over."""
    out = Path(out_dir)
    return out.parent / f".{out.name}.training-state.pt"


def train_run(config: RunConfig, out_dir: str | os.PathLike, overwrite: bool = False, progress: bool = True,
              resume: bool = False) -> Path:
    """Fit the preprocessing, train, score and write the run folder ``out_dir``; returns its path.

    The training state is saved after every epoch (:func:`training_state_path`) and removed when the
    run folder is written; with ``resume`` a run that was interrupted continues from its last saved
    epoch (to the same numbers as an uninterrupted run), otherwise it starts afresh."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another output folder or pass --overwrite")
    state_file = training_state_path(out)
    if state_file.exists() and not resume and is_main_process():
        state_file.unlink()
    started = time.perf_counter()
    schema = config.schema
    columns = schema.required_columns
    train_frame = read_table(config.data.train, columns)
    if config.data.valid:
        valid_frame = read_table(config.data.valid, columns)
    else:
        shuffled = train_frame.sample(frac=1.0, random_state=config.seed).reset_index(drop=True)
        cut = int(round(len(shuffled) * config.data.valid_fraction))
        if cut == 0 or cut == len(shuffled):
            raise DataError(f"{config.data.train}: too few rows ({len(shuffled)}) to hold out a validation split")
        valid_frame, train_frame = shuffled.iloc[:cut], shuffled.iloc[cut:]
    test_frame = read_table(config.data.test, columns) if config.data.test else None

    # All checks on the data happen here, before any training starts.
    preprocessor = TablePreprocessor(schema).fit(train_frame, source=config.data.train)
    train = preprocessor.transform(train_frame, source=config.data.train)
    valid = preprocessor.transform(valid_frame, source=config.data.valid or f"{config.data.train} (held out)")
    test = preprocessor.transform(test_frame, source=config.data.test) if test_frame is not None else None

    torch.manual_seed(config.seed)
    model = build_tabular_model(config.model["name"], preprocessor.encoder_config(), schema.tasks, config.model_options)
    training = TrainerConfig.from_dict({**config.training.to_dict(), "progress": progress and config.training.progress})
    out.parent.mkdir(parents=True, exist_ok=True)
    barrier()  # every rank sees the same state file, or none
    result = Trainer(model, training).fit(train.tensors, valid.tensors, valid_groups=valid.groups, state_file=state_file)

    batch = training.eval_batch_size
    in_units = preprocessor.scores_in_label_units
    # One forward pass per split: its outputs give the metrics and the reliability tables, and the
    # validation pass the gate usage too.
    gate_usage = GateUsageAccumulator(model)
    with model.recording_gates():
        outputs = {"valid": forward_outputs(model, valid.tensors, model.tasks, batch, after_batch=gate_usage.add_last_forward)}
    if test is not None:
        outputs["test"] = forward_outputs(model, test.tensors, model.tasks, batch)
    metrics: dict[str, Any] = {
        "model": config.model["name"],
        "parameters": model.count_parameters(),
        "best_step": result.best_step, "steps": result.steps, "stopped_early": result.stopped_early,
        "train_seconds": round(result.seconds, 2),
        "rows": {"train": len(train.tensors), "valid": len(valid.tensors), **({"test": len(test.tensors)} if test else {})},
        "valid": in_units(score_outputs(outputs["valid"], valid.tensors, model.tasks, valid.groups)),
        **({"standardized_labels": preprocessor.label_statistics} if preprocessor.label_statistics else {}),
        "out_of_vocabulary": {"valid": valid.out_of_vocabulary, **({"test": test.out_of_vocabulary} if test else {})},
    }
    if test is not None:
        metrics["test"] = in_units(score_outputs(outputs["test"], test.tensors, model.tasks, test.groups))

    if not is_main_process():  # under torchrun, rank 0 alone writes the run folder
        barrier()
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_text(staging / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
        preprocessor.save(staging / "preprocessing.json")
        save_checkpoint(staging / "model.pt", model, metadata={"best_step": result.best_step})
        write_json(staging / "metrics.json", metrics)
        history = pd.DataFrame([in_units({row["task"]: row})[row["task"]] for row in result.history])
        history.to_csv(staging / "history.csv", index=False)
        plot_learning_curves(history, staging / "learning_curves.png", f"{config.model['name']}: loss per task")
        scored_split, scored = ("test", test) if test is not None else ("valid", valid)
        reliability = _reliability_tables(model.tasks, outputs[scored_split], scored.tensors)
        if reliability:
            plot_reliability({name: table for name, (table, _) in reliability.items()}, staging / "calibration.png",
                             f"{config.model['name']}: predicted against observed means, {scored_split} rows",
                             {name: axes for name, (_, axes) in reliability.items()})
        gates = gate_usage.result()[0]
        if gates:
            save_gate_usage(gates, staging, f"{config.model['name']}: mean gate weights, validation rows", rows="valid")
        metrics["seconds"] = round(time.perf_counter() - started, 2)
        write_text(staging / "report.md", _report(config, metrics, gates, scored_split if reliability else None))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
        state_file.unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    barrier()
    return out


def _predict_tensors(model: TabularMultiTaskModel, tensors, batch_size: int) -> dict[str, torch.Tensor]:
    """``{task: predictions}`` of ``model.predict`` over encoded tensors, batch by batch."""
    parts: dict[str, list[torch.Tensor]] = {}
    for batch in tensors.batches(batch_size):
        for name, value in model.predict(batch.inputs).items():
            parts.setdefault(name, []).append(value)
    return {name: torch.cat(values) for name, values in parts.items()}


def _reliability_tables(tasks: Sequence[TaskSpec], outputs: Mapping[str, torch.Tensor], tensors
                        ) -> dict[str, tuple[pd.DataFrame, tuple[str, str]]]:
    """``{name: (table, chart's axis names)}``: the reliability table (:mod:`mtlkit.reports.calibration`)
    of each task whose predictions are means in its labels' units (binary, poisson, ziln) over its
    labelled rows, from the model's raw ``outputs`` on ``tensors``; for a task that also predicts the
    probability of a label above 0 (``<task>_p_positive``), that probability's against the observed share."""
    mask = tensors.label_mask
    tables = {}
    for k, task in enumerate(tasks):
        rows = mask[:, k]
        if task.type not in RELIABILITY_AXES or not bool(rows.any()):
            continue
        output, label = outputs[task.name][rows], tensors.labels[rows, k]
        tables[task.name] = (reliability_table(task.task_type.predict(output), label), RELIABILITY_AXES[task.type])
        positive = task.task_type.side_predictions.get("p_positive")
        if positive is not None:
            tables[f"{task.name}_p_positive"] = (reliability_table(positive(output), (label > 0).double()), POSITIVE_SHARE_AXES)
    return tables


def _report(config: RunConfig, metrics: dict[str, Any], gates: Mapping[str, GateUsage], calibrated_on: str | None) -> str:
    lines = [f"# mtlkit run: {config.model['name']}", "",
             f"- training rows {metrics['rows']['train']}, validation rows {metrics['rows']['valid']}"
             + (f", test rows {metrics['rows']['test']}" if "test" in metrics["rows"] else ""),
             f"- parameters {metrics['parameters']:,}; best step {metrics['best_step']} of {metrics['steps']}"
             f"{' (stopped early)' if metrics['stopped_early'] else ''}; {metrics['train_seconds']} s of training", ""]
    for split in ("valid", "test"):
        if split not in metrics:
            continue
        scores = metrics[split]
        names = sorted({m for s in scores.values() for m in s if m != "count"})
        lines += [f"## {split}", "", "| task | " + " | ".join(names) + " | labelled rows |",
                  "|" + "---|" * (len(names) + 2)]
        for task, values in scores.items():
            cells = [f"{values[m]:.4f}" if m in values else "" for m in names]
            lines.append(f"| {task} | " + " | ".join(cells) + f" | {int(values['count'])} |")
        lines.append("")
    task_types = {t.name: t.task_type for t in config.schema.tasks}
    for task, stats in metrics.get("standardized_labels", {}).items():
        if task_types[task].label_scaling == "geometric":
            lines.append(f"Task {task} was trained on its amounts divided by {stats['std']:.6g} (the geometric mean of its "
                         "positive training amounts): its loss is on that scale, its other metrics in the labels' units.")
        else:
            lines.append(f"Task {task} was trained on its labels standardised (training mean {stats['mean']:.6g}, standard "
                         f"deviation {stats['std']:.6g}): its loss is on that scale, its other metrics in the labels' units.")
    if config.schema.weight_column:
        lines.append(f"Losses and metrics count each row with its weight from column {config.schema.weight_column!r}.")
    unseen = {k: v for k, v in metrics["out_of_vocabulary"].get("valid", {}).items() if v}
    lines.append(f"Out-of-vocabulary values in validation: {unseen or 'none'}.")
    lines += ["", "![learning curves](learning_curves.png)", ""]
    if calibrated_on:
        lines += [f"## calibration ({calibrated_on} rows)", "",
                  "Each binary task's rows cut into ten groups by predicted probability: observed against mean predicted "
                  "positive rate (on the diagonal when the probabilities are right). Count (poisson) and amount (ziln) "
                  "tasks the same by predicted mean: their decile chart; and by their predicted probability of a count "
                  "or amount above 0 (<task>_p_positive) against the observed share.", "",
                  "![calibration](calibration.png)", ""]
    if gates:
        lines += ["## gates (validation rows)", "",
                  "How each gate spreads its weight over the experts it can choose: effective experts = exp(entropy of "
                  "its mean weights) (1: always the same expert); row entropy = a row's weight entropy over its "
                  "maximum (0: every row goes to one expert, a polarised gate). Full matrices in gate_usage.json.", "",
                  gate_usage_markdown(gates), "", "![gate weights](gate_usage.png)", ""]
    return "\n".join(lines)


@dataclass
class LoadedRun:
    """A trained run: its config, fitted preprocessing and model (in eval mode)."""

    config: RunConfig
    preprocessor: TablePreprocessor
    model: TabularMultiTaskModel

    def predict(self, frame: pd.DataFrame, source: str = "table") -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """``({task: predictions}, {column: out-of-vocabulary rows})`` for the rows of ``frame``:
        ``(N,)`` probabilities for binary tasks, ``(N,)`` values in the label's units for regression
        (the model itself predicts standardised labels, see ``TableSchema.standardize_labels``),
        ``(N, C)`` class probabilities for multiclass; side predictions (``TaskType.side_predictions``)
        as ``<task>_<name>``, ``spend_p_positive`` beside a ``ziln`` or ``poisson`` task's mean. Labels are not read."""
        encoded = self.preprocessor.transform(frame, source=source, with_labels=False)
        predicted = _predict_tensors(self.model, encoded.tensors, self.config.training.eval_batch_size)
        return {name: self.preprocessor.to_label_units(name, value) for name, value in predicted.items()}, encoded.out_of_vocabulary


def load_run(run_dir: str | os.PathLike) -> LoadedRun:
    """Load a run folder, checking that the preprocessing and the checkpoint belong together."""
    run = Path(run_dir)
    for name in ("config.yaml", "preprocessing.json", "model.pt"):
        if not (run / name).is_file():
            raise DataError(f"{run}: not a run folder (no {name})")
    config = from_mapping(RunConfig, yaml.safe_load((run / "config.yaml").read_text()), str(run / "config.yaml"))
    preprocessor = TablePreprocessor.load(run / "preprocessing.json")
    model, payload = load_checkpoint(run / "model.pt")
    # The columns' sizes must agree; how many embedding copies there are is the model's (STEM's views).
    expected = preprocessor.encoder_config().to_dict()
    del expected["views"]
    if {k: v for k, v in (payload.get("encoder_config") or {}).items() if k != "views"} != expected:
        raise DataError(f"{run}: the checkpoint's feature sizes {payload.get('encoder_config')} do not match "
                        f"preprocessing.json {expected}; the files come from different runs")
    if [t.name for t in model.tasks] != [t.name for t in preprocessor.schema.tasks]:
        raise DataError(f"{run}: the checkpoint's tasks {[t.name for t in model.tasks]} do not match the schema's "
                        f"{[t.name for t in preprocessor.schema.tasks]}")
    calibration_file = run / CALIBRATION_FILE
    if calibration_file.is_file():
        try:
            saved = json.loads(calibration_file.read_text())
            model.set_output_calibration({name: _calibration_from_dict(saved.get("method", "platt"), fitted)
                                          for name, fitted in saved["tasks"].items()})
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise DataError(f"{calibration_file}: not a calibration of this run's binary tasks ({error}); "
                            "delete it or run mtlkit calibrate again") from None
    model.eval()
    return LoadedRun(config, preprocessor, model)


CALIBRATION_FILE = "calibration.json"
CALIBRATION_METHODS = ("platt", "isotonic")


def _calibration_to_dict(fitted: tuple[float, float] | IsotonicCalibration) -> dict[str, Any]:
    """One task's calibration (Platt's ``(scale, shift)`` or an isotonic map) as ``calibration.json`` keeps it."""
    if isinstance(fitted, IsotonicCalibration):
        return fitted.to_dict()
    return {"scale": fitted[0], "shift": fitted[1]}


def _calibration_from_dict(method: str, fitted: Mapping[str, Any]) -> tuple[float, float] | IsotonicCalibration:
    """One task's calibration as saved in ``calibration.json``, as the model applies it (the inverse of :func:`_calibration_to_dict`)."""
    if method == "platt":
        return fitted["scale"], fitted["shift"]
    if method == "isotonic":
        return IsotonicCalibration(fitted["logits"], fitted["probabilities"])
    raise ValueError(f"unknown method {method!r}; expected one of {list(CALIBRATION_METHODS)}")


def calibrate_run(run_dir: str | os.PathLike, data_file: str | os.PathLike, method: str = "platt") -> dict[str, Any]:
    """Fit a calibration of every binary task of a run on a labelled table (held-out rows: the
    validation table, never the test table you report) and write ``calibration.json`` into the run;
    from then on ``load_run``'s predictions, ``mtlkit evaluate`` and ``mtlkit export`` apply it.
    A previous calibration is replaced, never compounded.

    ``method``: ``"platt"`` (``sigmoid(scale * logit + shift)``, the ranking unchanged) or
    ``"isotonic"`` (a non-decreasing piecewise-linear map, :mod:`mtlkit.training.output_calibration`).

    Returns ``{"method", "tasks": {task: {"scale", "shift"} or {"logits", "probabilities"}}, "before":
    scores, "after": scores}``, the scores (as :func:`evaluate_run`'s) on that same table, which
    flatters the "after" side (isotonic regression more than Platt scaling).
    """
    if method not in CALIBRATION_METHODS:
        raise ConfigError(f"calibration method: unknown {method!r}; expected one of {list(CALIBRATION_METHODS)}")
    run = load_run(run_dir)
    run.model.set_output_calibration(None)  # fitted on the model's own logits
    schema = run.preprocessor.schema
    frame = read_table(data_file, schema.required_columns)
    encoded = run.preprocessor.transform(frame, source=str(data_file))
    data, tasks = encoded.tensors, run.model.tasks
    binary = [(k, t.name) for k, t in enumerate(tasks) if t.type == "binary"]
    if not binary:
        raise ConfigError(f"{run_dir}: calibration applies to binary tasks; this run has none")

    def scores(outputs: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float]]:
        return run.preprocessor.scores_in_label_units(score_outputs(outputs, data, tasks, encoded.groups))

    outputs = forward_outputs(run.model, data, tasks, run.config.training.eval_batch_size)
    fitted = {}
    for k, name in binary:
        mask = data.label_mask[:, k]
        weight = None if data.sample_weight is None else data.sample_weight[mask]
        where = f"{data_file}: task {name!r}"
        if method == "platt":
            fitted[name] = fit_platt_scaling(outputs[name][mask, 0], data.labels[mask, k], weight, where=where)
        else:
            fitted[name] = IsotonicCalibration(*fit_isotonic_calibration(outputs[name][mask, 0], data.labels[mask, k], weight,
                                                                         where=where))
    before, after = scores(outputs), scores(apply_output_calibration(outputs, fitted))
    saved = {name: _calibration_to_dict(fit) for name, fit in fitted.items()}
    write_json(Path(run_dir) / CALIBRATION_FILE, {"method": method, "data": str(data_file), "rows": len(frame), "tasks": saved})
    return {"method": method, "tasks": saved, "before": before, "after": after}


def evaluate_run(run_dir: str | os.PathLike, data_file: str | os.PathLike) -> dict[str, Any]:
    """Metrics of a trained run on a labelled table (plus its out-of-vocabulary counts)."""
    run = load_run(run_dir)
    schema = run.preprocessor.schema
    frame = read_table(data_file, schema.required_columns)
    encoded = run.preprocessor.transform(frame, source=str(data_file))
    scores = run.preprocessor.scores_in_label_units(evaluate(
        run.model, encoded.tensors, run.model.tasks, run.config.training.eval_batch_size, groups=encoded.groups))
    return {"data": str(data_file), "rows": len(frame), "metrics": scores, "out_of_vocabulary": encoded.out_of_vocabulary}


def gate_usage_run(run_dir: str | os.PathLike, data_file: str | os.PathLike) -> dict[str, GateUsage]:
    """How the gates of a trained mixture of experts spread their weight over the experts on the rows
    of a table (labels not needed), read chunk by chunk: ``{gate bank path: GateUsage}``."""
    run = _run_with_gates(run_dir)
    return measure_gate_usage(run.model, (inputs for inputs, _ in _encoded_batches(run, data_file)))


def gate_usage_by_column_run(run_dir: str | os.PathLike, data_file: str | os.PathLike, column: str,
                             max_groups: int = 8) -> dict[str, dict[str, GateUsage]]:
    """:func:`gate_usage_run` for each value of ``column`` (any column of the table: a user segment, a
    label, ...): ``{value: {gate bank path: GateUsage}}`` for its ``max_groups`` most frequent values,
    the rest together as ``"(other)"``."""
    if max_groups < 1:
        raise ConfigError(f"max_groups: expected at least 1, got {max_groups}")
    run = _run_with_gates(run_dir)
    counts = pd.concat([chunk[column].astype(str) for chunk in iter_table(data_file, [column], run.config.data.chunk_rows)])
    counts = counts.value_counts()
    kept = list(counts.index[:max_groups])
    names = kept + (["(other)"] if len(counts) > max_groups else [])
    index = {value: i for i, value in enumerate(kept)}

    def batches():
        for inputs, chunk in _encoded_batches(run, data_file, [column]):
            codes = chunk[column].astype(str).map(index).fillna(len(kept)).to_numpy(dtype=np.int64)
            yield inputs, torch.from_numpy(codes)

    return dict(zip(names, measure_gate_usage_by_group(run.model, batches(), len(names))))


def _run_with_gates(run_dir: str | os.PathLike) -> LoadedRun:
    run = load_run(run_dir)
    if not run.model.gate_banks():
        raise ConfigError(f"{run_dir}: model {run.model.registry_name!r} has no gates; gate usage needs one of "
                          "omoe, mmoe, cgc, ple, adatt, stem")
    return run


def _encoded_batches(run: LoadedRun, data_file: str | os.PathLike, extra_columns: Sequence[str] = ()):
    """``(inputs, rows of the table)`` per evaluation batch, the table read chunk by chunk (labels not needed)."""
    columns = list(dict.fromkeys([*run.preprocessor.schema.feature_names, *extra_columns]))
    size = run.config.training.eval_batch_size
    for chunk in iter_table(data_file, columns, run.config.data.chunk_rows):
        encoded = run.preprocessor.transform(chunk, source=str(data_file), with_labels=False)
        for start, batch in zip(range(0, len(chunk), size), encoded.tensors.batches(size)):
            yield batch.inputs, chunk.iloc[start:start + size]


def compare_runs(run_dirs: Sequence[str | os.PathLike], split: str = "test") -> pd.DataFrame:
    """One row per run folder: model, parameters, best step, training seconds and every task metric
    (``<task>/<metric>``) on ``split`` (``"test"`` or ``"valid"``), from each run's ``metrics.json``."""
    if split not in ("test", "valid"):
        raise ConfigError(f"split: expected 'test' or 'valid', got {split!r}")
    rows = []
    for run_dir in run_dirs:
        path = Path(run_dir) / "metrics.json"
        if not path.is_file():
            raise DataError(f"{run_dir}: not a run folder (no metrics.json)")
        metrics = json.loads(path.read_text())
        if split not in metrics:
            raise DataError(f"{run_dir}: no {split} scores (its config has no {split} table); compare on --split valid")
        row = {"run": str(run_dir), "model": metrics["model"], "parameters": metrics["parameters"],
               "best_step": metrics["best_step"], "train_seconds": metrics["train_seconds"]}
        for task, values in metrics[split].items():
            row.update({f"{task}/{name}": value for name, value in values.items() if name != "count"})
        rows.append(row)
    return pd.DataFrame(rows).set_index("run")


def importance_run(run_dir: str | os.PathLike, data_file: str | os.PathLike, repeats: int = 3, seed: int = 0,
                   max_rows: int | None = None) -> FeatureImportance:
    """Permutation importance of every feature column for every task of a trained run, on a labelled
    table (a seeded sample of ``max_rows`` rows of it, if given): see
    :mod:`mtlkit.reports.feature_importance`."""
    run = load_run(run_dir)
    schema = run.preprocessor.schema
    frame = read_table(data_file, schema.required_columns)
    if max_rows is not None and len(frame) > max_rows:
        frame = frame.sample(n=max_rows, random_state=seed).reset_index(drop=True)

    def score(table: pd.DataFrame):
        encoded = run.preprocessor.transform(table, source=str(data_file))
        return run.preprocessor.scores_in_label_units(evaluate(
            run.model, encoded.tensors, run.model.tasks, run.config.training.eval_batch_size))

    return permutation_importance(frame, schema.feature_names, run.model.tasks, score, repeats=repeats, seed=seed)


def predict_run(run_dir: str | os.PathLike, data_file: str | os.PathLike, out_file: str | os.PathLike,
                keep_columns: tuple[str, ...] = ()) -> dict[str, Any]:
    """Write one prediction column per task (probability for binary, value in the label's units for
    regression, the mean and then ``<task>_p_positive`` for ``ziln`` and ``poisson``, the most likely class and then
    each class's probability for multiclass), chunk by chunk.

    Labels are not needed. ``keep_columns`` are copied through (e.g. an id). The output is written to a
    temporary file and renamed, so an error midway leaves no partial file.
    """
    run = load_run(run_dir)
    schema = run.preprocessor.schema
    columns = list(dict.fromkeys(schema.feature_names + ([schema.group_column] if schema.group_column else []) + list(keep_columns)))
    kind = table_format(out_file)
    out_file = Path(out_file)
    rows, unseen = 0, {}

    def write(tmp: str) -> None:
        nonlocal rows
        writer = None
        try:
            for i, chunk in enumerate(iter_table(data_file, columns, run.config.data.chunk_rows)):
                predictions, out_of_vocabulary = run.predict(chunk, source=str(data_file))
                for key, count in out_of_vocabulary.items():
                    unseen[key] = unseen.get(key, 0) + count
                table = _prediction_table(predictions, run.preprocessor.label_classes)
                clash = [c for c in keep_columns if c in table.columns]
                if clash:
                    raise ConfigError(f"--keep: {clash} would overwrite prediction columns of the same name "
                                      f"{list(table.columns)}; copy them under another name first")
                for column in reversed(keep_columns):
                    table.insert(0, column, chunk[column].to_numpy())
                rows += len(table)
                if kind == "parquet":
                    import pyarrow as pa
                    import pyarrow.parquet as pq

                    batch_table = pa.Table.from_pandas(table, preserve_index=False)
                    writer = writer or pq.ParquetWriter(tmp, batch_table.schema)
                    writer.write_table(batch_table)
                else:
                    table.to_csv(tmp, mode="w" if i == 0 else "a", header=i == 0, index=False,
                                 compression="gzip" if out_file.name.endswith(".gz") else None)
        finally:
            if writer is not None:
                writer.close()

    atomic_write(out_file, write)
    return {"rows": rows, "out": str(out_file), "out_of_vocabulary": unseen}


def _prediction_table(predictions: Mapping[str, torch.Tensor], class_names: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """One column per task, and for a multiclass task (``(N, C)`` probabilities) its most likely
    class (its name where the labels were names, see ``class_names``) followed by one
    ``<task>_p_<class>`` column of probabilities per class."""
    columns: dict[str, Any] = {}
    for name, values in predictions.items():
        if values.dim() == 1:
            columns[name] = values.numpy()
            continue
        classes = list(class_names.get(name, range(values.shape[1])))
        best = values.argmax(1).numpy()
        columns[name] = np.asarray(classes, dtype=object)[best] if name in class_names else best
        for c, label in enumerate(classes):
            columns[f"{name}_p_{label}"] = values[:, c].numpy()
    return pd.DataFrame(columns)


def initial_config(data_file: str | os.PathLike, labels: list[str], ignore: Sequence[str] = (),
                   sample_rows: int = 100_000) -> tuple[dict[str, Any], list[str], list[str]]:
    """A starting run config (as plain data) with a schema inferred from the first rows of ``data_file``.

    Columns in ``ignore`` are left out, and so are those that look like row identifiers
    (:func:`~mtlkit.data.schema.identifier_columns`). Returns the config, the identifiers left out and
    notes for the user (labels that form a conversion funnel, :func:`~mtlkit.data.schema.is_funnel`;
    amounts given the ``ziln`` task type, :func:`~mtlkit.data.schema.is_zero_inflated`).
    """
    frame = next(iter_table(data_file, chunk_rows=sample_rows))
    candidates = [c for c in frame.columns if c not in labels and c not in ignore]
    identifiers = identifier_columns(frame, candidates)
    schema = infer_schema(frame, labels, ignore=[*ignore, *identifiers])
    notes = []
    if is_funnel(frame, labels):
        notes.append(f"labels {' -> '.join(labels)} form a funnel (every positive of a step is a positive of the one "
                     "before): model.name aitm passes each step's knowledge to the next, and esmm_funnel multiplies "
                     "each step's rate given the one before, over all impressions; mmoe is kept as the start")
    for task in schema.tasks:
        if task.type == "ziln":
            share = (pd.to_numeric(frame[task.label_column], errors="coerce").dropna() == 0).mean()
            notes.append(f"label {task.label_column!r} is 0 on {share:.0%} of the rows and skewed otherwise, like spend: task "
                         "type ziln (zero-inflated lognormal); set type: regression for squared error, poisson for counts")
    return {
        "data": {"train": str(Path(data_file).resolve()), "valid": None, "test": None, "valid_fraction": 0.1},
        "schema": schema.to_dict(),
        "model": {"name": "mmoe", "num_experts": 8, "expert_hidden": [64], "tower_hidden": [32]},
        "training": TrainerConfig(max_epochs=10, batch_size=1024, patience=3).to_dict(),
        "seed": 0,
    }, identifiers, notes


def dump_config(data: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a config as YAML, or as TOML when the name ends in ``.toml``."""
    path = Path(path)
    if path.suffix.lower() == ".toml":
        raise ConfigError(f"{path}: writing TOML is not supported; write .yaml (TOML configs can be read)")
    return write_text(path, yaml.safe_dump(data, sort_keys=False))
