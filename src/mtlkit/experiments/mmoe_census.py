"""The MMoE paper's census-income experiment (section 6.3), with a gradient-boosted-trees baseline.

Every neural model shares one fitted preprocessing (fit on the 199,523 training rows), is trained
with early stopping on the validation half, and is scored once on the test half. The table reports
mean +- std test AUC per task over seeds, and the run with the best main-task test AUC, beside the
paper's numbers (``PAPER_RESULTS``). A single-task GBDT (scikit-learn's
HistGradientBoostingClassifier, 500 iterations, native categorical support) runs under the same
protocol, since it is what a practitioner tries first.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
import yaml

from mtlkit.data.census import CENSUS_GROUPS, CENSUS_PROTOCOLS, census_schema, load_census
from mtlkit.data.tensors import MultiTaskTensors
from mtlkit.errors import ConfigError, DataError
from mtlkit.features import TablePreprocessor
from mtlkit.files import atomic_write, read_json_lines, write_json, write_text
from mtlkit.models import build_tabular_model, get_model_class, list_models
from mtlkit.reports.plots import model_label, plot_metric_bars
from mtlkit.training import Trainer, TrainerConfig, evaluate

__all__ = ["CensusExperimentConfig", "PAPER_RESULTS", "load_hyperparameters", "run_mmoe_census", "gbdt_baseline"]

DEFAULT_MODELS = ("single_task", "shared_bottom", "omoe", "mmoe", "cgc", "ple")

# The MMoE paper's Tables 3 and 4 (AUC): mean over runs, and the run with the best main-task AUC.
PAPER_RESULTS: dict[int, dict[str, dict[str, float]]] = {
    1: {
        "single_task": {"income_best": 0.9398, "income_mean": 0.9337, "marital_best": 0.9933, "marital_mean": 0.9922},
        "shared_bottom": {"income_best": 0.9361, "income_mean": 0.9295, "marital_best": 0.9915, "marital_mean": 0.9921},
        "cross_stitch": {"income_best": 0.9406, "income_mean": 0.9361, "marital_best": 0.9917, "marital_mean": 0.9922},
        "omoe": {"income_best": 0.9387, "income_mean": 0.9319, "marital_best": 0.9928, "marital_mean": 0.9923},
        "mmoe": {"income_best": 0.9410, "income_mean": 0.9359, "marital_best": 0.9926, "marital_mean": 0.9927},
    },
    2: {
        "single_task": {"education_best": 0.8843, "education_mean": 0.8792, "marital_best": 0.9933, "marital_mean": 0.9922},
        "shared_bottom": {"education_best": 0.8836, "education_mean": 0.8813, "marital_best": 0.9927, "marital_mean": 0.9917},
        "cross_stitch": {"education_best": 0.8855, "education_mean": 0.8819, "marital_best": 0.9919, "marital_mean": 0.9921},
        "omoe": {"education_best": 0.8852, "education_mean": 0.8813, "marital_best": 0.9915, "marital_mean": 0.9912},
        "mmoe": {"education_best": 0.8860, "education_mean": 0.8826, "marital_best": 0.9932, "marital_mean": 0.9924},
    },
}


def load_hyperparameters(path: str | Path | None = None) -> dict[str, Any]:
    """The shipped ``configs/census.yaml`` (or another file of the same form)."""
    text = Path(path).read_text() if path else resources.files("mtlkit").joinpath("configs/census.yaml").read_text()
    data = yaml.safe_load(text)
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise ConfigError(f"{path or 'configs/census.yaml'}: expected keys embedding_dim, training, models")
    return data


@dataclass
class CensusExperimentConfig:
    """Settings of one census reproduction.

    Args:
        data_dir: folder with ``census-income.data.gz`` and ``census-income.test.gz``.
        group: 1 (income, never married) or 2 (education >= college, never married).
        protocol: ``paper`` or ``keep-education`` (group 1 only).
        seeds: runs per model (seeds ``first_seed .. first_seed + seeds - 1``).
        models: registered model names.
        gbdt: also train the single-task GBDT baseline.
        split_seed: seed of the 1:1 validation/test split of the test file (fixed across runs).
        hyperparameters: a YAML file in the form of the shipped ``configs/census.yaml`` (None: that one).
    """

    data_dir: str
    group: int = 1
    protocol: str = "paper"
    seeds: int = 3
    models: Sequence[str] = DEFAULT_MODELS
    gbdt: bool = True
    split_seed: int = 1
    first_seed: int = 0
    hyperparameters: str | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        if self.group not in CENSUS_GROUPS:
            raise ConfigError(f"group: expected one of {sorted(CENSUS_GROUPS)}, got {self.group!r}")
        if self.protocol not in CENSUS_PROTOCOLS:
            raise ConfigError(f"protocol: expected one of {list(CENSUS_PROTOCOLS)}, got {self.protocol!r}")
        self.models = tuple(self.models)
        # ESMM and ESCM2 need the fixed roles ctr, cvr and ctcvr, which census-income has not.
        unknown = [m for m in self.models if m not in list_models() or not get_model_class(m).any_number_of_tasks]
        if unknown:
            raise ConfigError(f"models: unknown or unsuitable {unknown}; expected some of {list(DEFAULT_MODELS)}")
        if not isinstance(self.seeds, int) or self.seeds < 1:
            raise ConfigError(f"seeds: expected an integer >= 1, got {self.seeds!r}")


def gbdt_baseline(train: MultiTaskTensors, test: MultiTaskTensors, seed: int = 0) -> dict[str, float]:
    """Test AUC of one HistGradientBoostingClassifier per task on the same features as the networks.

    The trees read the preprocessed tensors: normalised numbers plus categorical codes, declared as
    native categorical features (500 iterations, learning rate 0.1, scikit-learn's defaults otherwise).
    """
    from sklearn.ensemble import HistGradientBoostingClassifier

    from mtlkit.training.metrics import roc_auc

    def features(data: MultiTaskTensors) -> tuple[np.ndarray, list[bool]]:
        rows = len(data)
        dense = data.inputs.get("dense", torch.zeros(rows, 0)).numpy()
        codes = data.inputs.get("categorical", torch.zeros(rows, 0, dtype=torch.long)).numpy()
        return np.hstack([dense, codes]).astype(np.float64), [False] * dense.shape[1] + [True] * codes.shape[1]

    x_train, categorical = features(train)
    x_test, _ = features(test)
    result = {}
    for k, task in enumerate(train.task_names):
        model = HistGradientBoostingClassifier(max_iter=500, learning_rate=0.1, categorical_features=categorical,
                                               random_state=seed)
        model.fit(x_train, train.labels[:, k].numpy())
        scores = torch.from_numpy(model.predict_proba(x_test)[:, 1])
        result[task] = roc_auc(scores, test.labels[:, k])
    return result


def run_mmoe_census(config: CensusExperimentConfig, out_dir: str | Path,
                    on_progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """Train every (model, seed) not yet in ``out_dir/runs.jsonl`` and write the tables and the chart."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hyper = load_hyperparameters(config.hyperparameters)
    missing_hyper = [m for m in config.models if m not in hyper["models"]]
    if missing_hyper:
        raise ConfigError(f"hyperparameters: no settings for {missing_hyper}")
    settings = {"group": config.group, "protocol": config.protocol, "split_seed": config.split_seed,
                "embedding_dim": hyper.get("embedding_dim", 8), "training": hyper.get("training", {})}
    settings_file = out / "experiment.json"
    if settings_file.exists():
        previous = json.loads(settings_file.read_text())
        previous = {k: previous.get(k) for k in settings}
        if previous != settings:
            raise ConfigError(f"{out} holds results of other settings ({settings_file}); choose another --out")
    write_json(settings_file, settings)
    for record in read_json_lines(out / "runs.jsonl"):
        used = record.get("hyperparameters")
        if used is not None and record["model"] in config.models and used != hyper["models"][record["model"]]:
            raise ConfigError(f"{out}: {record['model']} was run with other hyper-parameters ({used}); choose another --out")

    schema = census_schema(config.group, config.protocol, hyper.get("embedding_dim", 8))
    tasks = [t.name for t in schema.tasks]
    runs_file = out / "runs.jsonl"
    done = {(r["model"], r["seed"]) for r in read_json_lines(runs_file)}
    todo = [(m, s) for m in config.models for s in range(config.first_seed, config.first_seed + config.seeds) if (m, s) not in done]
    need_gbdt = config.gbdt and ("gbdt", 0) not in done
    total = len(todo) + int(need_gbdt)
    finished = 0
    if todo or need_gbdt:
        started = time.perf_counter()
        preprocessor, train, valid, test = _tensorised(config, schema, out / "cache")
        preparation = time.perf_counter() - started
        with runs_file.open("a") as log:
            def keep(record: dict[str, Any]) -> None:
                nonlocal finished
                log.write(json.dumps(record) + "\n")
                log.flush()
                finished += 1
                if on_progress:
                    on_progress(finished, total, f"{model_label(record['model'])} seed {record['seed']}")

            if need_gbdt:
                t0 = time.perf_counter()
                keep({"model": "gbdt", "seed": 0, "test_auc": gbdt_baseline(train, test),
                      "seconds": time.perf_counter() - t0})
            for model_name, seed in todo:
                torch.manual_seed(seed)
                model = build_tabular_model(model_name, preprocessor.encoder_config(), schema.tasks, hyper["models"][model_name])
                trainer = Trainer(model, TrainerConfig.from_dict({**hyper.get("training", {}), "seed": seed,
                                                                  "progress": config.progress}))
                result = trainer.fit(train, valid)
                scores = evaluate(model, test, model.tasks)
                keep({"model": model_name, "seed": seed, "hyperparameters": hyper["models"][model_name],
                      "parameters": model.count_parameters(),
                      "test_auc": {t: scores[t]["auc"] for t in tasks},
                      "valid_auc": {t: v["auc"] for t, v in result.final("valid").items()},
                      "best_step": result.best_step, "steps": result.steps, "seconds": result.seconds,
                      "preparation_seconds": preparation})
    return summarise(out, config, tasks)


def summarise(out: Path, config: CensusExperimentConfig, tasks: Sequence[str]) -> dict[str, Any]:
    """Rebuild ``results.csv``, ``table.{md,csv,json}`` and ``auc.png`` from ``runs.jsonl``."""
    keep_models = set(config.models) | ({"gbdt"} if config.gbdt else set())
    runs = [r for r in read_json_lines(out / "runs.jsonl") if r["model"] in keep_models
            and (r["model"] == "gbdt" or config.first_seed <= r["seed"] < config.first_seed + config.seeds)]
    if not runs:
        raise ConfigError(f"no finished runs in {out}")
    results = pd.DataFrame([{"model": r["model"], "seed": r["seed"], **{f"test_auc_{t}": r["test_auc"][t] for t in tasks},
                             "parameters": r.get("parameters"), "seconds": r["seconds"]} for r in runs])
    atomic_write(out / "results.csv", lambda tmp: results.to_csv(tmp, index=False))
    main = tasks[0]
    rows = []
    order = [m for m in ("single_task", "shared_bottom", "cross_stitch", "omoe", "mmoe", "cgc", "ple", "adatt", "stem", "gbdt")
             if m in set(results["model"])]
    for model in order:
        part = results[results["model"] == model]
        best = part.loc[part[f"test_auc_{main}"].idxmax()]
        row: dict[str, Any] = {"model": model, "runs": len(part)}
        for task in tasks:
            row[f"{task}_mean"] = float(part[f"test_auc_{task}"].mean())
            row[f"{task}_std"] = float(part[f"test_auc_{task}"].std(ddof=1)) if len(part) > 1 else 0.0
            row[f"{task}_best_run"] = float(best[f"test_auc_{task}"])
        paper = PAPER_RESULTS.get(config.group, {}).get(model, {}) if config.protocol == "paper" else {}
        for task in tasks:
            row[f"paper_{task}_mean"] = paper.get(f"{task}_mean")
            row[f"paper_{task}_best"] = paper.get(f"{task}_best")
        rows.append(row)
    table = pd.DataFrame(rows)
    atomic_write(out / "table.csv", lambda tmp: table.to_csv(tmp, index=False))
    write_json(out / "table.json", {"group": config.group, "protocol": config.protocol, "tasks": list(tasks),
                                    "rows": rows, "runs": [{k: r[k] for k in ("model", "seed", "test_auc")} for r in runs]})
    write_text(out / "table.md", _markdown(table, tasks, config))
    bars = pd.DataFrame([{"model": r["model"], "task": t, "mean": r[f"{t}_mean"], "std": r[f"{t}_std"]}
                         for r in rows for t in tasks])
    plot_metric_bars(bars, out / "auc.png", f"census-income group {config.group} ({config.protocol}): test AUC, mean +- std")
    return {"table": table, "results": results}


def _fingerprint(config: CensusExperimentConfig, schema) -> str:
    """Identifies the tensorised data: the raw files (size and modification time), schema and split."""
    import hashlib

    from mtlkit.data.census import TEST_FILE, TRAIN_FILE

    files = [Path(config.data_dir) / name for name in (TRAIN_FILE, TEST_FILE)]
    for f in files:
        if not f.is_file():
            raise DataError(f"{f}: no such file (expected the raw UCI file {f.name})")
    key = {"files": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files], "schema": schema.to_dict(),
           "split_seed": config.split_seed, "format": 1}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _tensorised(config: CensusExperimentConfig, schema, cache_dir: Path):
    """Fitted preprocessing and the three splits as tensors, from the cache when the fingerprint matches.

    The cache is a plain dict of tensors plus the preprocessing JSON, read with ``weights_only=True``.
    """
    path = cache_dir / f"census-{_fingerprint(config, schema)}.pt"
    names = [t.name for t in schema.tasks]
    if path.is_file():
        cached = torch.load(path, weights_only=True)
        preprocessor = TablePreprocessor.from_dict(json.loads(cached["preprocessing"]))
        splits = [MultiTaskTensors(cached[s]["inputs"], cached[s]["labels"], names, validate=False)
                  for s in ("train", "valid", "test")]
        return (preprocessor, *splits)
    data = load_census(config.data_dir, config.group, config.protocol, config.split_seed, schema.default_embedding_dim)
    preprocessor = TablePreprocessor(schema).fit(data.train, source="census-income.data.gz")
    splits = [preprocessor.transform(data.train, "census-income.data.gz").tensors,
              preprocessor.transform(data.valid, "census-income.test.gz (validation half)").tensors,
              preprocessor.transform(data.test, "census-income.test.gz (test half)").tensors]
    payload = {"preprocessing": json.dumps(preprocessor.to_dict())}
    for name, split in zip(("train", "valid", "test"), splits):
        payload[name] = {"inputs": dict(split.inputs), "labels": split.labels}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return (preprocessor, *splits)


def _markdown(table: pd.DataFrame, tasks: Sequence[str], config: CensusExperimentConfig) -> str:
    main = tasks[0]
    header = ["model", "runs"] + [f"{t} AUC mean ± std" for t in tasks] + [f"{main} (best run)", f"{tasks[1]} (same run)"]
    if config.protocol == "paper":
        header += [f"paper {t} mean" for t in tasks] + [f"paper {main} best"]
    lines = [f"Census-income group {config.group}, protocol `{config.protocol}`: test AUC on the test half "
             f"(split seed {config.split_seed}). GBDT is one run.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in table.iterrows():
        cells = [model_label(r["model"]), str(int(r["runs"]))]
        cells += [f"{r[f'{t}_mean']:.4f} ± {r[f'{t}_std']:.4f}" for t in tasks]
        cells += [f"{r[f'{main}_best_run']:.4f}", f"{r[f'{tasks[1]}_best_run']:.4f}"]
        if config.protocol == "paper":
            paper = [r.get(f"paper_{t}_mean") for t in tasks] + [r.get(f"paper_{main}_best")]
            cells += [f"{v:.4f}" if isinstance(v, float) and v == v else "" for v in paper]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
