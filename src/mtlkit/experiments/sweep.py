"""Sweeps: one run config trained at every point of a grid of settings, each with several seeds.

Comparing models or settings on one's own table is only honest over seeds: a single run's AUC moves
by more than many differences between models. A sweep writes one run folder per (point, seed),
resumes where it stopped (finished folders are kept), and summarises each point's test (or
validation) metrics as mean and standard deviation over its seeds.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import yaml

from mtlkit.errors import ConfigError
from mtlkit.experiments.tabular_run import load_run_config, train_run
from mtlkit.files import atomic_write, write_json, write_text

__all__ = ["parse_grid", "run_sweep", "summarise_sweep"]


def parse_grid(entries: Sequence[str]) -> list[tuple[str, list[Any]]]:
    """``["model.name=[mmoe, ple]", "training.learning_rate=[0.001, 0.01]"]`` -> ``[(key, values), ...]``
    (values read as YAML; a single value is a one-point axis)."""
    axes = []
    for entry in entries:
        key, sep, text = entry.partition("=")
        key = key.strip()
        if not sep or not key or not all(key.split(".")):
            raise ConfigError(f"--grid: expected KEY=[VALUE, ...] with a dotted key (model.name=[mmoe, ple]), got {entry!r}")
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"--grid {key}: not a YAML value ({error})") from None
        values = values if isinstance(values, list) else [values]
        if not values:
            raise ConfigError(f"--grid {key}: no values")
        if key in (k for k, _ in axes):
            raise ConfigError(f"--grid {key}: given twice")
        axes.append((key, values))
    return axes


def run_sweep(config_path: str | os.PathLike, grid: Sequence[str], out_dir: str | os.PathLike, seeds: int = 1,
              overrides: Sequence[str] = (), split: str = "test",
              on_progress: Callable[[int, int, str], None] | None = None) -> pd.DataFrame:
    """Train ``config_path`` at every point of ``grid`` with ``seeds`` seeds each (the config's seed,
    then the next ones) into ``out_dir/point<i>-seed<s>``, and summarise (:func:`summarise_sweep`).

    Every point's config is validated before the first run starts. Folders already finished are
    kept, so a sweep resumes where it stopped; a folder of another sweep (other config, grid, seeds
    or overrides) is an error. ``overrides`` (``--set``) apply to every point.
    """
    if seeds < 1:
        raise ConfigError(f"--seeds: expected at least 1, got {seeds}")
    if split not in ("test", "valid"):
        raise ConfigError(f"--split: expected 'test' or 'valid', got {split!r}")
    out = Path(out_dir)
    axes = parse_grid(grid)
    keys = [key for key, _ in axes]
    points = [dict(zip(keys, values)) for values in itertools.product(*(values for _, values in axes))]
    settings = {"config": str(Path(config_path).resolve()), "grid": [[k, v] for k, v in axes], "seeds": seeds,
                "overrides": list(overrides)}
    if (out / "sweep.json").is_file():
        previous = json.loads((out / "sweep.json").read_text())
        if previous != settings:
            raise ConfigError(f"{out} holds another sweep ({out / 'sweep.json'}); choose another --out")
    base_seed = load_run_config(config_path, overrides).seed
    runs = []
    for index, point in enumerate(points):
        for s in range(seeds):
            # JSON is YAML: each value goes through load_run_config's own override parser.
            point_overrides = [*overrides, *(f"{k}={json.dumps(v)}" for k, v in point.items()), f"seed={base_seed + s}"]
            runs.append((index, s, point, load_run_config(config_path, point_overrides)))  # all validated up front
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "sweep.json", settings)
    for done, (index, s, point, config) in enumerate(runs):
        folder = out / f"point{index:02d}-seed{s}"
        if on_progress is not None:
            on_progress(done, len(runs), f"{_describe(point)}, seed {config.seed}")
        if not (folder / "metrics.json").is_file():
            train_run(config, folder, overwrite=True, progress=False)
    if on_progress is not None:
        on_progress(len(runs), len(runs), "done")
    rows = []
    for index, s, point, config in runs:
        metrics = json.loads((out / f"point{index:02d}-seed{s}" / "metrics.json").read_text())
        if split not in metrics:
            raise ConfigError(f"--split {split}: the runs have no {split} scores (the config has no {split} table)")
        row = {"point": index, "seed": config.seed, **{k: json.dumps(v) if isinstance(v, (dict, list)) else v
                                                        for k, v in point.items()},
               "train_seconds": metrics["train_seconds"]}
        for task, values in metrics[split].items():
            row.update({f"{task}/{name}": value for name, value in values.items() if name not in ("count", "loss")})
        rows.append(row)
    table = pd.DataFrame(rows)
    atomic_write(out / "runs.csv", lambda tmp: table.to_csv(tmp, index=False))
    summary = summarise_sweep(table, keys)
    atomic_write(out / "summary.csv", lambda tmp: summary.to_csv(tmp, index=False))
    write_text(out / "summary.md", _markdown(summary, keys, seeds, split))
    return summary


def summarise_sweep(runs: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """One row per point: its settings, then ``<metric>_mean`` and ``<metric>_std`` over its seeds."""
    metrics = [c for c in runs.columns if "/" in c] + ["train_seconds"]
    grouped = runs.groupby("point", sort=True)
    summary = grouped[list(keys)].first().reset_index()
    summary["seeds"] = grouped.size().to_numpy()
    for metric in metrics:
        summary[f"{metric}_mean"] = grouped[metric].mean().to_numpy()
        summary[f"{metric}_std"] = grouped[metric].std(ddof=1).to_numpy()
    return summary


def _describe(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in point.items())


def _markdown(summary: pd.DataFrame, keys: Sequence[str], seeds: int, split: str) -> str:
    metrics = [c[: -len("_mean")] for c in summary.columns if c.endswith("_mean")]
    lines = [f"# sweep: {split} scores, mean +- std over {seeds} seed(s)", "",
             "| " + " | ".join([*keys, *metrics]) + " |", "|" + "---|" * (len(keys) + len(metrics))]
    for _, row in summary.iterrows():
        cells = [str(row[k]) for k in keys]
        cells += [f"{row[f'{m}_mean']:.4f} +- " + ("n/a" if pd.isna(row[f"{m}_std"]) else f"{row[f'{m}_std']:.4f}")
                  for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
