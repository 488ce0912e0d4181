"""The synthetic task-relatedness sweep of the MMoE paper (Ma et al., KDD 2018, section 5, Figures 4
and 5) and of the PLE paper (Tang et al., RecSys 2020: each task's MTL gain against correlation).

A :class:`SyntheticSetup` holds one paper's generator preset, networks and grid. For every task
correlation and seed, fresh data is generated (the seed varies data *and* initialisation, as in the
papers' "independent runs") and every model is trained on it at the setup's reference model's
parameter budget. Each finished run is appended to ``runs.jsonl`` at once, so an interrupted sweep
resumes where it stopped; the summary, history and figures are rebuilt from all runs at the end.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch

from mtlkit.data.synthetic import SyntheticConfig, make_synthetic
from mtlkit.errors import ConfigError
from mtlkit.files import atomic_write, read_json_lines, write_json, write_text
from mtlkit.models import build_model, match_parameter_budget, model_config
from mtlkit.reports.plots import gain_tasks, model_label, plot_final_loss_distribution, plot_loss_curves, plot_mtl_gain
from mtlkit.training import Trainer, TrainerConfig
from mtlkit.training.trainer import LR_SCHEDULES

__all__ = ["SyntheticSetup", "SYNTHETIC_SETUPS", "SyntheticSweepConfig", "sweep_profile", "run_synthetic_sweep",
           "model_configs_at_equal_budget", "mtl_gain", "paired_comparisons"]


@dataclass(frozen=True)
class SyntheticSetup:
    """One paper's synthetic experiment: what data, which networks, which grid.

    Args:
        name: the key in ``SYNTHETIC_SETUPS`` (and the ``mtlkit reproduce <name>-synthetic`` command).
        title: how figures and tables name it.
        generator: the ``SYNTHETIC_PRESETS`` entry that makes the data (input width, sine terms, noise).
        reference_model, reference_config: the model whose parameter count every other model is sized to.
        model_sizing: per model, the layer-width field sized to that budget (``None``: used as given) and
            the config it starts from.
        correlations, models: the default grid.
        profiles: named settings (``quick``, ``paper``): :class:`SyntheticSweepConfig` fields.
        comparisons: ``(model, baseline)`` pairs compared run by run at every correlation (the paper's claims;
            a pair whose models were not run is left out).
    """

    name: str
    title: str
    generator: str
    reference_model: str
    reference_config: dict[str, Any]
    model_sizing: dict[str, tuple[str | None, dict[str, Any]]]
    correlations: tuple[float, ...]
    models: tuple[str, ...]
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    comparisons: tuple[tuple[str, str], ...] = ()


# The MMoE paper's networks: 8 experts of one 16-unit layer, towers of 8 units, on 100 inputs.
_MMOE_REFERENCE: dict[str, Any] = dict(num_experts=8, expert_hidden=(16,), tower_hidden=(8,))
# The PLE paper gives the towers ([256, 128, 64]) and the data (512 inputs, 1.4 M rows per correlation),
# not the experts: ours are one 64-unit layer, MMoE with 3 of them, as many as CGC's and each PLE level's
# (one shared expert and one per task), so the models differ in how they route, not in how many experts.
_PLE_TOWERS = (256, 128, 64)
_PLE_REFERENCE: dict[str, Any] = dict(num_experts=3, expert_hidden=(64,), tower_hidden=_PLE_TOWERS)

SYNTHETIC_SETUPS: dict[str, SyntheticSetup] = {
    "mmoe": SyntheticSetup(
        name="mmoe", title="MMoE synthetic", generator="mmoe",
        reference_model="mmoe", reference_config=_MMOE_REFERENCE,
        # OMoE keeps MMoE's experts exactly (the paper's comparison: the same experts, one gate fewer).
        model_sizing={
            "single_task": ("bottom_hidden", dict(bottom_hidden=(16,), tower_hidden=(8,))),
            "shared_bottom": ("bottom_hidden", dict(bottom_hidden=(113,), tower_hidden=(8,))),
            "omoe": (None, _MMOE_REFERENCE),
            "mmoe": (None, _MMOE_REFERENCE),
            "cgc": ("expert_hidden", dict(num_shared_experts=4, num_task_experts=2, expert_hidden=(16,), tower_hidden=(8,))),
            "ple": ("expert_hidden", dict(num_shared_experts=4, num_task_experts=2, num_levels=2, expert_hidden=(16,),
                                          tower_hidden=(8,))),
            # Not in the paper; PLE's experts, every gate over all of them (--models adatt).
            "adatt": ("expert_hidden", dict(num_shared_experts=4, num_task_experts=2, num_levels=2, expert_hidden=(16,),
                                            tower_hidden=(8,))),
        },
        correlations=(1.0, 0.9, 0.5, 0.1),
        models=("single_task", "shared_bottom", "omoe", "mmoe", "cgc", "ple"),
        profiles={
            # Minutes on 2 CPU cores: enough steps for the models to separate, 4 seeds for a spread.
            "quick": dict(seeds=4),
            # The paper: 10,000 steps, 200 independent runs per model and correlation (hours; resumable).
            "paper": dict(seeds=200, steps=10_000, eval_every=200),
        },
        comparisons=(("mmoe", "shared_bottom"), ("adatt", "ple")),  # the second only where --models adds adatt
    ),
    "ple": SyntheticSetup(
        name="ple", title="PLE synthetic", generator="ple",
        reference_model="mmoe", reference_config=_PLE_REFERENCE,
        model_sizing={
            "single_task": ("bottom_hidden", dict(bottom_hidden=(64,), tower_hidden=_PLE_TOWERS)),
            "shared_bottom": ("bottom_hidden", dict(bottom_hidden=(192,), tower_hidden=_PLE_TOWERS)),
            "mmoe": (None, _PLE_REFERENCE),
            "cgc": ("expert_hidden", dict(num_shared_experts=1, num_task_experts=1, expert_hidden=(64,),
                                          tower_hidden=_PLE_TOWERS)),
            "ple": ("expert_hidden", dict(num_shared_experts=1, num_task_experts=1, num_levels=2, expert_hidden=(64,),
                                          tower_hidden=_PLE_TOWERS)),
            "adatt": ("expert_hidden", dict(num_shared_experts=1, num_task_experts=1, num_levels=2, expert_hidden=(64,),
                                            tower_hidden=_PLE_TOWERS)),
        },
        correlations=(1.0, 0.75, 0.5, 0.4, 0.2),
        models=("single_task", "shared_bottom", "mmoe", "cgc", "ple"),
        profiles={
            "quick": dict(seeds=3, steps=2_000, batch_size=256, lr_schedule="cosine", eval_every=250,
                          valid_rows=10_000, test_rows=10_000),
            # The paper's 1.4 M rows per correlation: 1.2 M seen once in training, 100,000 each held out.
            "paper": dict(seeds=20, steps=4_688, batch_size=256, lr_schedule="cosine", eval_every=250,
                          valid_rows=100_000, test_rows=100_000),
        },
        comparisons=(("mmoe", "shared_bottom"), ("ple", "mmoe"), ("adatt", "ple")),
    ),
}


def _setup(name: str) -> SyntheticSetup:
    if name not in SYNTHETIC_SETUPS:
        raise ConfigError(f"setup: unknown {name!r}; expected one of {sorted(SYNTHETIC_SETUPS)}")
    return SYNTHETIC_SETUPS[name]


@dataclass
class SyntheticSweepConfig:
    """Settings of one sweep. :func:`sweep_profile` gives a setup's named ones.

    Args:
        setup: the experiment (``SYNTHETIC_SETUPS``): ``"mmoe"`` (d = 100, the MMoE paper's networks)
            or ``"ple"`` (d = 512, towers [256, 128, 64]).
        correlations: task correlations (cosine of the task weight vectors) to sweep; ``None``: the setup's.
        models: registered model names the setup sizes; ``None``: the setup's.
        seeds: independent runs per (model, correlation).
        steps: training steps per run (Adam, no early stopping: the papers plot loss against steps).
        batch_size, learning_rate: Adam settings.
        lr_schedule: ``"constant"`` (the MMoE set-up: the paper plots the loss along training) or a decay to
            0 at the last step (``"cosine"``, ``"linear"``: the PLE set-up, whose gains are a few 0.001 of
            MSE, about as much as a constant rate's last evaluations move from one to the next).
        eval_every: steps between test-loss evaluations (the curves' resolution).
        train_rows: training rows per run; ``None`` (default) gives ``steps * batch_size``, so every
            step sees fresh samples and the test loss measures what a model can represent, not how
            much it overfits 10,000 rows (with 10,000 rows all models overfit and the comparison is noise).
        valid_rows, test_rows: held-out rows per run.
        first_seed: seed of the first run; run ``i`` uses ``first_seed + i``.
        profile: the profile's name, for titles.
    """

    setup: str = "mmoe"
    correlations: Sequence[float] | None = None
    models: Sequence[str] | None = None
    seeds: int = 3
    steps: int = 3000
    batch_size: int = 128
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"
    eval_every: int = 100
    train_rows: int | None = None
    valid_rows: int = 1_000
    test_rows: int = 1_000
    first_seed: int = 0
    profile: str = "custom"

    def __post_init__(self) -> None:
        setup = _setup(self.setup)
        self.correlations = tuple(float(c) for c in (setup.correlations if self.correlations is None else self.correlations))
        self.models = tuple(setup.models if self.models is None else self.models)
        for corr in self.correlations:
            if not -1.0 <= corr <= 1.0:
                raise ConfigError(f"correlations: every correlation must lie in [-1, 1], got {corr}")
        unknown = [m for m in self.models if m not in setup.model_sizing]
        if unknown:
            raise ConfigError(f"models: unknown {unknown} in the {setup.name} set-up; expected some of {sorted(setup.model_sizing)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule: expected one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        for key in ("seeds", "steps", "batch_size", "eval_every", "train_rows", "valid_rows", "test_rows"):
            value = getattr(self, key)
            if key == "train_rows" and value is None:
                continue
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key}: expected an integer >= 1, got {value!r}")

    @property
    def resolved_setup(self) -> SyntheticSetup:
        return SYNTHETIC_SETUPS[self.setup]

    @property
    def resolved_train_rows(self) -> int:
        return self.train_rows if self.train_rows is not None else self.steps * self.batch_size

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


def sweep_profile(setup: str, profile: str = "quick", **changes: Any) -> SyntheticSweepConfig:
    """The settings of ``setup``'s named ``profile`` (``quick`` or ``paper``), with ``changes`` on top."""
    profiles = _setup(setup).profiles
    if profile not in profiles:
        raise ConfigError(f"--profile: unknown {profile!r}; expected one of {sorted(profiles)}")
    return SyntheticSweepConfig(**{"setup": setup, "profile": profile, **profiles[profile], **changes})


def model_configs_at_equal_budget(models: Sequence[str], input_dim: int, tasks: Sequence[dict],
                                  setup: str = "mmoe") -> dict[str, Any]:
    """Resolved configs of ``models`` sized to the setup's reference model's parameter count (the
    papers' equal-budget rule)."""
    chosen = SYNTHETIC_SETUPS[setup]
    reference = build_model(chosen.reference_model, input_dim=input_dim, tasks=tasks, **chosen.reference_config)
    budget = reference.count_parameters()
    configs = {}
    for name in models:
        sized_field, start = chosen.model_sizing[name]
        base = model_config(name, dict(input_dim=input_dim, tasks=tasks, **start))
        configs[name] = match_parameter_budget(name, base, budget, sized_field) if sized_field else base
    return configs


def _run_group(config: SyntheticSweepConfig, correlation: float, seed: int, models: Sequence[str],
               threads: int | None) -> list[dict[str, Any]]:
    """Generate one dataset and train ``models`` on it (one unit of work; runs in a worker process)."""
    if threads:
        torch.set_num_threads(threads)
    # The data seed does not depend on the correlation: seed i draws the same directions, sine
    # parameters and inputs at every correlation, so only the task relatedness changes across panels.
    generator = SyntheticConfig.preset(config.resolved_setup.generator)
    train_rows = config.resolved_train_rows
    total_rows = train_rows + config.valid_rows + config.test_rows
    data = make_synthetic(dataclasses.replace(generator, correlation=correlation, num_rows=total_rows, seed=seed))
    tensors = data.to_tensors()
    splits = (tensors.subset(slice(0, train_rows)),
              tensors.subset(slice(train_rows, train_rows + config.valid_rows)),
              tensors.subset(slice(train_rows + config.valid_rows, total_rows)))
    configs = model_configs_at_equal_budget(models, data.inputs.shape[1], [t.to_dict() for t in data.tasks], config.setup)
    records = []
    for model_name in models:
        run = _run_one(config, model_name, configs[model_name], splits, seed)
        records.append({"model": model_name, "correlation": correlation, "seed": seed,
                        "label_correlation": float(data.label_correlation[0, -1]), **run})
    return records


def _run_one(config: SyntheticSweepConfig, model_name: str, model_cfg, splits, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = build_model(model_name, model_cfg)
    trainer = Trainer(model, TrainerConfig(
        learning_rate=config.learning_rate, lr_schedule=config.lr_schedule, batch_size=config.batch_size, max_steps=config.steps,
        max_epochs=None, eval_every=config.eval_every, patience=None, restore_best=False,
        seed=seed, progress=False,
    ))
    train, valid, test = splits
    result = trainer.fit(train, extra_eval={"valid": valid, "test": test})
    final = {r["task"]: r["loss"] for r in result.history if r["split"] == "test" and r["step"] == result.steps}
    return {
        "parameters": model.count_parameters(),
        "final_test_loss": final,
        "seconds": result.seconds,
        "history": [{k: r[k] for k in ("step", "split", "task", "loss")} for r in result.history],
    }


def run_synthetic_sweep(config: SyntheticSweepConfig, out_dir: str | Path, jobs: int = 1,
                       on_progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) a sweep into ``out_dir``; returns the summary tables.

    Args:
        jobs: worker processes, one (data set, models) group each; each uses one thread, because these
            small networks gain nothing from a second thread but two processes double throughput.

    Writes ``sweep.json`` (the settings), ``runs.jsonl`` (one line per finished run, with its history),
    ``summary.csv``, ``history.csv``, ``table.csv``/``table.md`` (mean and std of the final mean test loss
    per model and correlation), ``mtl_gain.csv``/``mtl_gain.md`` (the PLE paper's MTL gain per task over
    the single-task model, and seesaw runs; with ``single_task`` in the sweep), ``loss_curves.png``
    (the MMoE paper's Figure 4), ``final_loss_distribution.png`` (its Figure 5) and ``mtl_gain.png`` (the
    PLE paper's MTL gain per task against correlation).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = config.to_dict()
    sweep_file = out / "sweep.json"
    free = ("seeds", "correlations", "models", "profile")  # growing the grid is a resume, not a conflict
    if sweep_file.exists():
        previous = json.loads(sweep_file.read_text())
        if "setup" not in previous:  # written before the PLE set-up: "generator" named the setup then
            previous["setup"] = previous.pop("generator", "mmoe")
        # A field added since that file was written had its default value in that sweep.
        defaults = {f.name: f.default for f in dataclasses.fields(SyntheticSweepConfig)}
        previous = {k: v for k, v in {**defaults, **previous}.items() if k not in free}
        current = {k: v for k, v in settings.items() if k not in free}
        if previous != current:
            changed = {k: (previous.get(k), current.get(k)) for k in current if previous.get(k) != current.get(k)}
            raise ConfigError(f"{out} holds a sweep with other settings ({sweep_file}: {changed}); "
                              "choose another --out or delete that folder")
    write_json(sweep_file, settings)
    runs_file = out / "runs.jsonl"
    done = {(r["model"], r["correlation"], r["seed"]) for r in read_json_lines(runs_file)}
    groups = []
    for corr in config.correlations:
        for seed in range(config.first_seed, config.first_seed + config.seeds):
            missing = [m for m in config.models if (m, corr, seed) not in done]
            if missing:
                groups.append((corr, seed, missing))
    total = len(config.correlations) * config.seeds * len(config.models)
    finished = total - sum(len(g[2]) for g in groups)

    with runs_file.open("a") as log:
        if runs_file.stat().st_size and not runs_file.read_bytes().endswith(b"\n"):
            log.write("\n")  # an interrupted write left a partial line; start a fresh one

        def keep(records: list[dict[str, Any]]) -> None:
            nonlocal finished
            for record in records:
                log.write(json.dumps(record) + "\n")
                finished += 1
            log.flush()
            if on_progress and records:
                r = records[-1]
                on_progress(finished, total, f"corr={r['correlation']:g} seed={r['seed']}")

        if on_progress:
            on_progress(finished, total, "starting")
        if jobs <= 1:
            for corr, seed, missing in groups:
                keep(_run_group(config, corr, seed, missing, threads=None))
        else:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
                futures = [pool.submit(_run_group, config, corr, seed, missing, 1) for corr, seed, missing in groups]
                for future in as_completed(futures):
                    keep(future.result())
    return summarise(out, config)


def summarise(out: Path, config: SyntheticSweepConfig) -> dict[str, Any]:
    """Rebuild the CSV tables and the figures from ``runs.jsonl`` (only runs of this sweep's grid)."""
    keep_models, keep_corr = set(config.models), set(config.correlations)
    runs = [r for r in read_json_lines(out / "runs.jsonl") if r["model"] in keep_models and r["correlation"] in keep_corr
            and config.first_seed <= r["seed"] < config.first_seed + config.seeds]
    if not runs:
        raise ConfigError(f"no finished runs in {out}")
    summary_rows, history_rows = [], []
    for r in runs:
        losses = r["final_test_loss"]
        summary_rows.append({
            "model": r["model"], "correlation": r["correlation"], "seed": r["seed"],
            **{f"test_loss_{task}": value for task, value in losses.items()},
            "mean_loss": sum(losses.values()) / len(losses),
            "parameters": r["parameters"], "label_correlation": r["label_correlation"], "seconds": r["seconds"],
        })
        for h in r["history"]:
            history_rows.append({"model": r["model"], "correlation": r["correlation"], "seed": r["seed"], **h})
    summary = pd.DataFrame(summary_rows).sort_values(["correlation", "model", "seed"], ascending=[False, True, True])
    history = pd.DataFrame(history_rows)
    atomic_write(out / "summary.csv", lambda tmp: summary.to_csv(tmp, index=False))
    atomic_write(out / "history.csv", lambda tmp: history.to_csv(tmp, index=False))

    table = (summary.groupby(["model", "correlation"])["mean_loss"].agg(["mean", "std", "count"]).reset_index())
    atomic_write(out / "table.csv", lambda tmp: table.to_csv(tmp, index=False))
    write_text(out / "table.md", _markdown_table(table, config))

    gain = mtl_gain(summary)
    if len(gain):
        atomic_write(out / "mtl_gain.csv", lambda tmp: gain.to_csv(tmp, index=False))
        write_text(out / "mtl_gain.md", _markdown_gain(gain, config))

    test = history[history["split"] == "test"]
    curves = test.groupby(["model", "correlation", "seed", "step"])["loss"].mean().reset_index()
    title = f"{config.resolved_setup.title} ({config.profile})"
    plot_loss_curves(curves, out / "loss_curves.png",
                     f"{title}: mean test loss over {config.seeds} seeds (band: interquartile range)")
    plot_final_loss_distribution(summary, out / "final_loss_distribution.png",
                                 f"{title}: final test loss over {config.seeds} runs per model")
    if len(gain):
        plot_mtl_gain(gain, out / "mtl_gain.png", f"{title}: MTL gain over Single-Task, mean +- std over {config.seeds} seeds")
    claims = paired_comparisons(summary, config.resolved_setup.comparisons)
    return {"summary": summary, "table": table, "claims": claims, "mtl_gain": gain}


def mtl_gain(summary: pd.DataFrame) -> pd.DataFrame:
    """The PLE paper's measure: each task's MTL gain, the single-task model's test MSE minus the
    model's, paired by seed (same data), per model and correlation; positive is better. A run is a
    seesaw when one task gains and another loses.

    Returns one row per (model, correlation): ``gain_<task>`` and ``gain_<task>_std`` over seeds,
    ``mean_gain`` (over tasks and seeds), ``seesaw_runs`` and ``runs``; empty without single-task runs.
    """
    tasks = sorted(c[len("test_loss_"):] for c in summary.columns if c.startswith("test_loss_"))
    if "single_task" not in set(summary["model"]) or not tasks:
        return pd.DataFrame()
    base = summary[summary["model"] == "single_task"].set_index(["correlation", "seed"])
    rows = []
    for (model, corr), part in summary[summary["model"] != "single_task"].groupby(["model", "correlation"]):
        paired = part.set_index(["correlation", "seed"])
        gains = pd.DataFrame({t: base[f"test_loss_{t}"] - paired[f"test_loss_{t}"] for t in tasks}).dropna()
        if gains.empty:
            continue
        row: dict[str, Any] = {"model": model, "correlation": corr}
        for t in tasks:
            row[f"gain_{t}"] = float(gains[t].mean())
            row[f"gain_{t}_std"] = float(gains[t].std()) if len(gains) > 1 else 0.0
        row["mean_gain"] = float(gains.to_numpy().mean())
        row["seesaw_runs"] = int(((gains > 0).any(axis=1) & (gains < 0).any(axis=1)).sum())
        row["runs"] = len(gains)
        rows.append(row)
    return pd.DataFrame(rows)


def paired_comparisons(summary: pd.DataFrame, pairs: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """Each ``(model, baseline)`` pair's final mean test loss compared run by run (same data and seed)
    at every correlation; pairs with a model missing from ``summary`` are left out.

    Returns one dict per pair and correlation: ``model``, ``baseline``, ``correlation``, ``runs``,
    ``model_mean``, ``baseline_mean``, ``model_wins`` (paired runs where the model's loss is lower) and
    ``mean_gap`` (baseline minus model; positive: the model is better).
    """
    claims = []
    wide = summary.pivot_table(index=["correlation", "seed"], columns="model", values="mean_loss")
    for model, baseline in pairs:
        if not {model, baseline} <= set(wide.columns):
            continue
        for corr, part in wide.groupby(level=0):
            diff = (part[baseline] - part[model]).dropna()
            claims.append({
                "model": model, "baseline": baseline, "correlation": float(corr), "runs": int(diff.size),
                "model_mean": float(part[model].mean()), "baseline_mean": float(part[baseline].mean()),
                "model_wins": int((diff > 0).sum()), "mean_gap": float(diff.mean()),
            })
    return claims


def _markdown_gain(gain: pd.DataFrame, config: SyntheticSweepConfig) -> str:
    tasks = gain_tasks(gain)
    correlations = sorted(gain["correlation"].unique(), reverse=True)
    lines = [f"MTL gain (single-task test MSE minus the model's, paired by seed; positive is better), mean +- std over "
             f"{config.seeds} seeds, {config.steps} steps; seesaw: runs where one task gains and another loses.", "",
             "| model | correlation | " + " | ".join(f"gain {t}" for t in tasks) + " | mean gain | seesaw runs |",
             "|" + "---|" * (len(tasks) + 4)]
    for m in [m for m in config.resolved_setup.model_sizing if m in set(gain["model"])]:
        for c in correlations:
            row = gain[(gain["model"] == m) & (gain["correlation"] == c)]
            if not len(row):
                continue
            r = row.iloc[0]
            cells = [f"{r[f'gain_{t}']:+.4f} +- {r[f'gain_{t}_std']:.4f}" for t in tasks]
            lines.append(f"| {model_label(m)} | {c:g} | " + " | ".join(cells)
                         + f" | {r['mean_gain']:+.4f} | {r['seesaw_runs']} of {r['runs']} |")
    return "\n".join(lines) + "\n"


def _markdown_table(table: pd.DataFrame, config: SyntheticSweepConfig) -> str:
    correlations = sorted(table["correlation"].unique(), reverse=True)
    models = [m for m in config.resolved_setup.model_sizing if m in set(table["model"])]
    header = "| model | " + " | ".join(f"corr {c:g}" for c in correlations) + " |"
    lines = [f"Final mean test loss (MSE), mean +- std over {config.seeds} seeds, {config.steps} steps.", "",
             header, "|" + "---|" * (len(correlations) + 1)]
    for m in models:
        cells = []
        for c in correlations:
            row = table[(table["model"] == m) & (table["correlation"] == c)]
            cells.append(f"{row['mean'].iloc[0]:.4f} +- {0 if pd.isna(row['std'].iloc[0]) else row['std'].iloc[0]:.4f}" if len(row) else "")
        lines.append(f"| {model_label(m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
