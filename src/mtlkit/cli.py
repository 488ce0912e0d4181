"""The ``mtlkit`` command line (typer). Every command goes through the same Python API."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from mtlkit.errors import MtlkitError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="mtlkit: multi-task learning with mixtures of experts (MMoE, PLE, ESMM, ...).")
reproduce_app = typer.Typer(no_args_is_help=True, help="Reproduce the papers' experiments.")
app.add_typer(reproduce_app, name="reproduce")
console = Console()


@app.command("models")
def models_command() -> None:
    """List the registered models and their config fields."""
    from mtlkit.models import get_model_class, list_models

    table = Table("name", "class", "config fields")
    for name in list_models():
        cls = get_model_class(name)
        table.add_row(name, cls.__name__, ", ".join(cls.config_class.field_names()))
    console.print(table)


def _method_summary(method: object) -> str:
    """A method's name and reference: its docstring's opening up to the reference's closing
    parenthesis (``PCGrad ("projecting conflicting gradients", Yu et al., NeurIPS 2020)``), or its
    first sentence."""
    text = " ".join((inspect.getdoc(method) or "").split("\n\n")[0].replace("``", "").split())
    opening = text.find(" (")
    if 0 < opening < 40:
        depth = 0
        for position in range(opening + 1, len(text)):
            depth += {"(": 1, ")": -1}.get(text[position], 0)
            if depth == 0:
                return text[: position + 1]
    return text.split(". ")[0].rstrip(".")


def _options_cell(options: dict) -> str:
    return ", ".join(f"{name} (needed)" if default is inspect.Parameter.empty else f"{name}={default!r}"
                     for name, default in options.items()) or "-"


@app.command("objectives")
def objectives_command() -> None:
    """List the loss weightings and gradient surgeries, with their options and defaults."""
    from mtlkit.objectives import (get_gradient_surgery, get_weighting, gradient_surgery_options, list_gradient_surgeries,
                                   list_weightings, refused_scopes, weighting_options)
    from mtlkit.training.trainer import GRADIENT_SURGERY_SCOPES

    weightings = Table("training.weighting", "method", "training.weighting_options", title="loss weightings")
    for name in list_weightings():
        weightings.add_row(name, _method_summary(get_weighting(name)), _options_cell(weighting_options(name)))
    console.print(weightings)
    surgeries = Table("training.gradient_surgery", "method", "training.gradient_surgery_options",
                      "training.gradient_surgery_scope", title="gradient surgeries")
    for name in list_gradient_surgeries():
        surgery = get_gradient_surgery(name)
        scopes = ", ".join(scope for scope in GRADIENT_SURGERY_SCOPES if scope not in refused_scopes(surgery))
        surgeries.add_row(name, _method_summary(surgery), _options_cell(gradient_surgery_options(name)), scopes)
    console.print(surgeries)


def _synthetic_command(setup: str):
    """The options of ``mtlkit reproduce <setup>-synthetic``: one command per set-up, one implementation."""

    def command(
        profile: str = typer.Option("quick", help="quick (minutes) or paper (the paper's sizes and run counts; hours, resumable)."),
        seeds: Optional[int] = typer.Option(None, min=1, help="Independent runs per model and correlation (default: the profile's)."),
        out: Path = typer.Option(Path(f"runs/{setup}-synthetic"), help="Output folder (resumes a sweep found there)."),
        correlations: Optional[str] = typer.Option(None, help="Comma-separated correlations (default: the paper's)."),
        models: Optional[str] = typer.Option(None, help="Comma-separated model names (default: all the set-up sizes)."),
        steps: Optional[int] = typer.Option(None, min=1, help="Training steps per run (default: the profile's)."),
        jobs: int = typer.Option(0, min=0, help="Worker processes (0: one per CPU core)."),
    ) -> None:
        changes: dict = {}
        if seeds is not None:
            changes["seeds"] = seeds
        if steps is not None:
            changes["steps"] = steps
        if correlations:
            changes["correlations"] = tuple(_parse_floats(correlations, "--correlations"))
        if models:
            changes["models"] = tuple(_names(models))
        _reproduce_synthetic(setup, profile, changes, out, jobs)

    return command


def _reproduce_synthetic(setup: str, profile: str, changes: dict, out: Path, jobs: int) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mtlkit.experiments.synthetic_sweep import run_synthetic_sweep, sweep_profile
    from mtlkit.reports.plots import model_label

    config = sweep_profile(setup, profile, **changes)
    console.print(f"[bold]{setup}-synthetic[/] profile={config.profile} seeds={config.seeds} steps={config.steps} "
                  f"correlations={list(config.correlations)} -> {out}")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        bar = progress.add_task("runs", total=None)

        def on_progress(done: int, total: int, what: str) -> None:
            progress.update(bar, completed=done, total=total, description=what)

        result = run_synthetic_sweep(config, out, jobs=jobs or os.cpu_count() or 1, on_progress=on_progress)

    table = result["table"]
    corrs = sorted(table["correlation"].unique(), reverse=True)
    view = Table(title=f"final mean test loss (MSE), mean +- std over {config.seeds} seeds")
    view.add_column("model")
    for c in corrs:
        view.add_column(f"corr {c:g}", justify="right")
    for model in config.models:
        cells = []
        for c in corrs:
            row = table[(table["model"] == model) & (table["correlation"] == c)]
            std = row["std"].iloc[0] if len(row) else float("nan")
            cells.append(f"{row['mean'].iloc[0]:.4f}±{0.0 if std != std else std:.3f}" if len(row) else "-")
        view.add_row(model_label(model), *cells)
    console.print(view)
    for claim in result["claims"]:
        model, baseline = model_label(claim["model"]), model_label(claim["baseline"])
        verdict = "below" if claim["model_mean"] < claim["baseline_mean"] else "NOT below"
        console.print(f"corr {claim['correlation']:g}: {model} mean {claim['model_mean']:.4f} is {verdict} {baseline} "
                      f"{claim['baseline_mean']:.4f}; {model} better in {claim['model_wins']}/{claim['runs']} paired runs")
    gain = result["mtl_gain"]
    written = "summary.csv, history.csv, table.md, loss_curves.png, final_loss_distribution.png"
    if len(gain):
        means = gain.groupby("model")["mean_gain"].mean()
        seesaws = gain.groupby("model")[["seesaw_runs", "runs"]].sum()
        console.print("MTL gain over Single-Task (mean over tasks, seeds and correlations; mtl_gain.md per task): " + ", ".join(
            f"{model_label(m)} {means[m]:+.4f} (seesaw in {seesaws.loc[m, 'seesaw_runs']} of {seesaws.loc[m, 'runs']} runs)"
            for m in config.models if m in means.index))
        written += ", mtl_gain.md, mtl_gain.png"
    console.print(f"wrote {written} in {out}")


reproduce_app.command(
    "mmoe-synthetic",
    help="The MMoE paper's synthetic experiment: loss vs task correlation, at equal parameter budgets.",
)(_synthetic_command("mmoe"))
reproduce_app.command(
    "ple-synthetic",
    help="The PLE paper's synthetic experiment (512 inputs, towers 256-128-64): each task's MTL gain over "
         "Single-Task vs task correlation, and the seesaw runs.",
)(_synthetic_command("ple"))


@reproduce_app.command("mmoe-census")
def reproduce_mmoe_census(
    data: Path = typer.Option(..., "--data", help="Folder with census-income.data.gz and census-income.test.gz."),
    group: int = typer.Option(1, help="1: income + never married; 2: education >= college + never married."),
    seeds: int = typer.Option(3, min=1, help="Runs per model (3 finish in under 30 minutes on 2 cores)."),
    models: Optional[str] = typer.Option(None, help="Comma-separated models (default: all six)."),
    protocol: str = typer.Option("paper", help="paper (education and marital status removed) or keep-education."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default: runs/mmoe-census-g<group>-<protocol>)."),
    gbdt: bool = typer.Option(True, help="Also run the single-task gradient-boosted-trees baseline."),
    hyperparameters: Optional[Path] = typer.Option(None, help="A YAML like the shipped configs/census.yaml."),
) -> None:
    """The MMoE paper's census-income experiment, beside the paper's numbers and a GBDT baseline."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mtlkit.experiments.mmoe_census import DEFAULT_MODELS, CensusExperimentConfig, run_mmoe_census

    config = CensusExperimentConfig(
        data_dir=str(data), group=group, protocol=protocol, seeds=seeds,
        models=tuple(_names(models)) if models else DEFAULT_MODELS,
        gbdt=gbdt, hyperparameters=str(hyperparameters) if hyperparameters else None)
    out = out or Path("runs") / f"mmoe-census-g{group}-{protocol}"
    console.print(f"[bold]mmoe-census[/] group={group} protocol={protocol} seeds={seeds} models={list(config.models)} -> {out}")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        bar = progress.add_task("reading and preprocessing", total=None)
        run_mmoe_census(config, out, on_progress=lambda done, total, what: progress.update(
            bar, completed=done, total=total, description=what))
    console.print((out / "table.md").read_text())
    console.print(f"wrote {out}/table.md, table.csv, table.json, results.csv, auc.png")


@app.command("prepare-census")
def prepare_census_command(
    data: Path = typer.Option(..., "--data", help="Folder with the raw UCI census-income files."),
    out: Path = typer.Option(Path("data/census"), help="Where to write train/valid/test.parquet."),
    split_seed: int = typer.Option(1, help="Seed of the 1:1 validation/test split of the test file."),
) -> None:
    """Turn the raw census-income files into Parquet tables with 0/1 label columns (for mtlkit train)."""
    from mtlkit.data.census import export_census

    for path in export_census(data, out, split_seed):
        console.print(f"wrote {path}")


@app.command("train")
def train_command(
    config: Path = typer.Option(..., "--config", help="Run config (YAML or TOML): data, schema, model, training."),
    out: Optional[Path] = typer.Option(None, help="Run folder to create (default: runs/<config name>)."),
    overwrite: bool = typer.Option(False, help="Replace an existing run folder."),
    resume: bool = typer.Option(False, help="Continue an interrupted run from its last finished epoch (the state "
                                "is saved beside --out after every epoch); without it an interrupted run starts afresh."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a config value, e.g. --set training.max_epochs=5 "
                                             "--set model.name=ple (repeatable; values read as YAML)."),
) -> None:
    """Train a model on your own table and write a run folder."""
    import json

    from mtlkit.experiments.tabular_run import load_run_config, train_run, training_state_path
    from mtlkit.training.distributed import init_distributed, is_main_process

    init_distributed()  # a no-op unless launched by torchrun
    run_config = load_run_config(config, set_ or ())
    out = out or Path("runs") / config.stem
    if resume and is_main_process():
        state = training_state_path(out)
        console.print(f"resuming from {state}" if state.exists() else f"no saved state at {state}; starting afresh")
    folder = train_run(run_config, out, overwrite=overwrite, resume=resume)
    if not is_main_process():
        return
    metrics = json.loads((folder / "metrics.json").read_text())
    _print_scores(metrics.get("test") or metrics["valid"], "test" if "test" in metrics else "valid")
    console.print(f"wrote {folder}/ ({', '.join(sorted(p.name for p in folder.iterdir()))})")


@app.command("evaluate")
def evaluate_command(
    run: Path = typer.Argument(..., help="A run folder written by 'mtlkit train'."),
    data: Path = typer.Option(..., "--data", help="A labelled table (CSV, CSV.gz or Parquet)."),
    out: Optional[Path] = typer.Option(None, help="Also write the metrics as JSON here."),
) -> None:
    """Score a trained run on a labelled table."""
    from mtlkit.experiments.tabular_run import evaluate_run
    from mtlkit.files import write_json

    result = evaluate_run(run, data)
    _print_scores(result["metrics"], str(data))
    unseen = {k: v for k, v in result["out_of_vocabulary"].items() if v}
    if unseen:
        console.print(f"out-of-vocabulary values (mapped to the OOV bucket): {unseen}")
    if out:
        write_json(out, result)


@app.command("calibrate")
def calibrate_command(
    run: Path = typer.Argument(..., help="A run folder written by 'mtlkit train'."),
    data: Path = typer.Option(..., "--data", help="Held-out labelled rows (the validation table; not the test table you report)."),
    method: str = typer.Option("platt", "--method", help="platt: sigmoid(scale * logit + shift), the ranking unchanged; "
                               "isotonic: any non-decreasing map (more rows needed; its steps can tie rows)."),
) -> None:
    """Fit a calibration of every binary task's probabilities on a labelled table and save it in the
    run: predict, evaluate and export then apply it. Platt scaling leaves the ranking, hence AUC,
    unchanged; isotonic regression can move the AUC a little."""
    from mtlkit.experiments.tabular_run import calibrate_run

    result = calibrate_run(run, data, method)
    table = Table("task", "fit", "logloss before", "logloss after", "calibration before", "calibration after",
                  "AUC before", "AUC after", title=f"{method} calibration fitted on {data} (scores on those same rows)")
    for name, fitted in result["tasks"].items():
        before, after = result["before"][name], result["after"][name]
        fit = (f"scale {fitted['scale']:.4f}, shift {fitted['shift']:+.4f}" if method == "platt"
               else f"{len(fitted['logits'])} knots")
        table.add_row(name, fit, _cell(before["logloss"]), _cell(after["logloss"]), _cell(before["calibration"]),
                      _cell(after["calibration"]), _cell(before.get("auc")), _cell(after.get("auc")))
    console.print(table)
    console.print(f"wrote {run}/calibration.json")


@app.command("predict")
def predict_command(
    run: Path = typer.Argument(..., help="A run folder written by 'mtlkit train'."),
    data: Path = typer.Option(..., "--data", help="A table with the feature columns (labels not needed)."),
    out: Path = typer.Option(..., "--out", help="Output table, CSV or Parquet by its name: one column per task "
                             "(a multiclass task adds one per class)."),
    keep: Optional[str] = typer.Option(None, help="Comma-separated input columns to copy into the output (e.g. an id)."),
) -> None:
    """Predict every task for every row, streaming the table in chunks."""
    from mtlkit.experiments.tabular_run import predict_run

    keep_columns = tuple(_names(keep)) if keep else ()
    result = predict_run(run, data, out, keep_columns)
    unseen = {k: v for k, v in result["out_of_vocabulary"].items() if v}
    console.print(f"wrote {result['rows']} rows to {out}" + (f"; out-of-vocabulary values: {unseen}" if unseen else ""))


@app.command("export")
def export_command(
    run: Path = typer.Argument(..., help="A run folder written by 'mtlkit train'."),
    out: Path = typer.Option(..., "--out", help="The program to write (.pt2)."),
) -> None:
    """Export a trained run as a torch.export program that serves predictions with PyTorch alone."""
    from mtlkit.experiments.serving import export_run

    export_run(run, out)
    console.print(f"wrote {out}: torch.export.load('{out}').module()(inputs) with the encoded inputs of "
                  f"{run}/preprocessing.json gives every task's predictions")


@app.command("gates")
def gates_command(
    run: Path = typer.Argument(..., help="A run folder written by 'mtlkit train' (omoe, mmoe, cgc, ple, adatt or stem)."),
    data: Path = typer.Option(..., "--data", help="A table with the feature columns (labels not needed)."),
    by: Optional[str] = typer.Option(None, help="Also split the rows by this column's values (a segment, a label): "
                                     "one column per value in each gate's table."),
    max_groups: int = typer.Option(8, min=1, help="With --by: the most frequent values shown; the rest as '(other)'."),
    out: Optional[Path] = typer.Option(None, help="Also write gate_usage.json and gate_usage.png into this folder "
                                       "(with --by: gate_usage_by_<column>.json)."),
) -> None:
    """How the gates spread their weight over the experts: mean weight per gate and expert, effective
    number of experts, row entropy and experts no gate uses."""
    from mtlkit.experiments.tabular_run import gate_usage_by_column_run, gate_usage_run
    from mtlkit.files import write_json
    from mtlkit.reports.gate_usage import save_gate_usage

    if by is not None:
        groups = gate_usage_by_column_run(run, data, by, max_groups)
        first = next(iter(groups.values()))
        for path, usage in first.items():
            for g, gate in enumerate(usage.gate_names):
                # Experts as rows, one column per value of the column: how this gate's choice moves with it.
                table = Table("expert", *[f"{by}={value} ({u[path].rows})" for value, u in groups.items()],
                              title=f"{path}, gate {gate}: mean weight by {by}")
                for e, expert in enumerate(usage.expert_names):
                    if usage.choices[g, e]:
                        table.add_row(expert, *[f"{u[path].mean_weight[g, e]:.3f}" for u in groups.values()])
                table.add_row("effective experts", *[f"{u[path].effective_experts[g]:.2f}" for u in groups.values()],
                              style="dim")
                console.print(table)
        if out:
            out.mkdir(parents=True, exist_ok=True)
            path = write_json(out / f"gate_usage_by_{by}.json", {"rows": str(data), "by": by, "groups": {
                value: {bank: u.to_dict() for bank, u in usage.items()} for value, usage in groups.items()}})
            console.print(f"wrote {path}")
        return
    usages = gate_usage_run(run, data)
    for path, usage in usages.items():
        # Experts as rows: a level has many experts and few gates, so the table stays narrow.
        table = Table("expert", *usage.gate_names, title=f"{path}: mean gate weight")
        for e, expert in enumerate(usage.expert_names):
            table.add_row(expert, *[f"{w:.3f}" if chosen else "" for w, chosen in zip(usage.mean_weight[:, e], usage.choices[:, e])],
                          end_section=e == len(usage.expert_names) - 1)
        table.add_row("effective experts", *[f"{n:.2f} of {int(c)}" for n, c in zip(usage.effective_experts, usage.choices.sum(1))])
        table.add_row("row entropy", *[f"{h:.2f}" for h in usage.row_entropy])
        table.add_row("experts per row", *[f"{n:.2f}" for n in usage.experts_per_row])
        console.print(table)
        unused = usage.unused_experts()
        console.print(f"{usage.rows} rows; experts below 1% of every gate that can choose them: {', '.join(unused) or 'none'}",
                      highlight=False)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        written = save_gate_usage(usages, out, f"{run.name}: mean gate weights", rows=str(data))
        console.print(f"wrote {', '.join(str(p) for p in written)}")


@app.command("sweep")
def sweep_command(
    config: Path = typer.Option(..., "--config", help="The run config every point starts from."),
    grid: list[str] = typer.Option(..., "--grid", help="KEY=[VALUE, ...], values read as YAML (repeatable; every "
                                   "combination is a point), e.g. --grid 'model.name=[mmoe, ple]' "
                                   "--grid 'training.learning_rate=[0.001, 0.003]'."),
    seeds: int = typer.Option(3, min=1, help="Runs per point: the config's seed and the next ones."),
    out: Path = typer.Option(..., "--out", help="Sweep folder: one run folder per point and seed, runs.csv, summary.csv, "
                             "summary.md (resumes a sweep found there)."),
    split: str = typer.Option("test", help="test or valid: the scores summarised."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a config value at every point (repeatable)."),
) -> None:
    """Train one config at every point of a grid of settings, several seeds each, and summarise each
    point's metrics as mean +- std over its seeds."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mtlkit.experiments.sweep import run_sweep

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("sweep", total=None)

        def on_progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=what)

        summary = run_sweep(config, grid, out, seeds=seeds, overrides=set_ or (), split=split, on_progress=on_progress)
    keys = [c for c in summary.columns[1:] if c != "seeds" and not c.endswith(("_mean", "_std"))]
    metrics = [c[: -len("_mean")] for c in summary.columns if c.endswith("_mean")]
    # Points as columns, settings and metrics as rows: a sweep has a few points and many metrics.
    table = Table("", *[f"point {p}" for p in summary["point"]], title=f"{split} scores, mean +- std over {seeds} seed(s)")
    for key in keys:
        table.add_row(key, *[str(v) for v in summary[key]], end_section=key == keys[-1])
    for metric in metrics:
        table.add_row(metric, *[f"{_cell(m)} +- {_cell(d)}"  # one seed: no spread, n/a
                                for m, d in zip(summary[metric + "_mean"], summary[metric + "_std"])])
    console.print(table)
    console.print(f"wrote {out}/ (one run folder per point and seed, runs.csv, summary.csv, summary.md)")


@app.command("compare")
def compare_command(
    runs: list[Path] = typer.Argument(..., help="Run folders written by 'mtlkit train'."),
    split: str = typer.Option("test", help="test or valid: which scores of each run's metrics.json."),
    out: Optional[Path] = typer.Option(None, help="Also write the table as CSV here."),
) -> None:
    """Several runs side by side: model, size, training time and every task metric; the best value of
    each metric in bold."""
    from mtlkit.experiments.tabular_run import compare_runs
    from mtlkit.training.metrics import HIGHER_IS_BETTER, NOT_MONITORABLE

    frame = compare_runs(runs, split)
    # Runs as columns: one compares a few runs on many metrics, so the table stays narrow.
    table = Table("", *[Path(r).name for r in frame.index], title=f"{split} scores")
    table.add_row("model", *frame["model"])
    table.add_row("parameters", *[f"{int(v):,}" for v in frame["parameters"]])
    table.add_row("best step", *[str(v) for v in frame["best_step"]])
    table.add_row("training seconds", *[f"{v:.1f}" for v in frame["train_seconds"]], end_section=True)
    for column in (c for c in frame.columns if "/" in c):
        metric, values = column.split("/")[-1], frame[column].astype(float)
        best = None
        if metric not in NOT_MONITORABLE and values.notna().any() and len(frame) > 1:
            best = values.idxmax() if metric in HIGHER_IS_BETTER else values.idxmin()
        table.add_row(column, *[f"[bold]{_cell(v)}[/]" if run_name == best else _cell(v) for run_name, v in values.items()])
    console.print(table)
    if out:
        _write_csv(frame, out)


@app.command("importance")
def importance_command(
    run: Path = typer.Argument(..., help="A run folder written by 'mtlkit train'."),
    data: Path = typer.Option(..., "--data", help="A labelled table (CSV, CSV.gz or Parquet), e.g. the test split."),
    repeats: int = typer.Option(3, min=1, help="Shuffles per column (mean and standard deviation over them)."),
    rows: Optional[int] = typer.Option(None, min=1, help="Score a seeded sample of this many rows (faster on big tables)."),
    seed: int = typer.Option(0, help="Seed of the shuffles and of the sample."),
    out: Optional[Path] = typer.Option(None, help="Also write the table as CSV here."),
) -> None:
    """Permutation importance of every feature column for every task: how much each task's main metric
    (AUC, MSE, accuracy) gets worse when the column is shuffled."""
    from mtlkit.experiments.tabular_run import importance_run
    from mtlkit.training.metrics import HIGHER_IS_BETTER

    result = importance_run(run, data, repeats=repeats, seed=seed, max_rows=rows)
    tasks = list(result.metrics)
    table = Table("column", *[f"{t}: {result.metrics[t]} {'drop' if result.metrics[t] in HIGHER_IS_BETTER else 'rise'}"
                              for t in tasks],
                  title=f"permutation importance ({repeats} shuffles; mean +- std); baseline "
                        + ", ".join(f"{t} {result.metrics[t]} {_cell(result.baseline[t])}" for t in tasks))
    ranked = result.table()
    for column, values in ranked.iterrows():
        table.add_row(str(column), *[f"{values[t]:.4f} +- {values[f'{t}_std']:.4f}" for t in tasks])
    console.print(table)
    if out:
        _write_csv(ranked, out)


@app.command("init-config")
def init_config_command(
    data: Path = typer.Option(..., "--data", help="A table to infer the schema from."),
    labels: str = typer.Option(..., help="Comma-separated label columns (one task each)."),
    out: Path = typer.Option(Path("run.yaml"), help="Where to write the starting config."),
    ignore: str = typer.Option("", help="Comma-separated columns to leave out of the schema (ids, leaky columns)."),
) -> None:
    """Write a starting run config with a schema inferred from a table, for you to edit.

    Columns holding a different whole number or text on every row look like row identifiers and are
    left out too; each is named, so it can be put back in the schema by hand."""
    from mtlkit.experiments.tabular_run import dump_config, initial_config

    if out.exists():
        raise MtlkitError(f"{out} already exists; choose another --out")
    config, identifiers, notes = initial_config(data, _names(labels), ignore=_names(ignore))
    dump_config(config, out)
    for column in identifiers:
        console.print(f"left out {column!r}: a different value on every row looks like an identifier, not a feature "
                      f"(add it to schema.dense or schema.categorical in {out} to use it)", highlight=False)
    for note in notes:
        console.print(note, highlight=False)
    console.print(f"wrote {out}; review the schema (dense vs categorical, task types), then: mtlkit train --config {out}")


def _write_csv(frame, path: Path) -> None:
    """A table as CSV (with its index), through a temporary file."""
    from mtlkit.files import atomic_write

    atomic_write(path, lambda tmp: frame.to_csv(tmp))
    console.print(f"wrote {path}")


def _names(text: str) -> list[str]:
    """The names of a comma-separated option, blanks dropped."""
    return [name.strip() for name in text.split(",") if name.strip()]


def _print_scores(scores: dict, title: str) -> None:
    """Metrics as rows and tasks as columns: task types of several kinds report a dozen metrics between
    them, which side by side would not fit a terminal (or a log's 80 columns)."""
    names = sorted({m for s in scores.values() for m in s if m != "count"})
    table = Table("", *scores, title=title)
    for name in names:
        table.add_row(name, *[_cell(values[name]) if name in values else "" for values in scores.values()])
    table.add_row("labelled rows", *[str(int(values["count"])) for values in scores.values()])
    console.print(table)


def _cell(value) -> str:
    """A metric in a table: 4 decimals; "n/a" where it is undefined (NaN, or null read back from JSON)."""
    if value is None or value != value:
        return "n/a"
    return f"{value:.4f}"


def _parse_floats(text: str, option: str) -> list[float]:
    try:
        return [float(part) for part in _names(text)]
    except ValueError:
        raise MtlkitError(f"{option}: expected comma-separated numbers, got {text!r}") from None


def main() -> None:
    """Console entry point: user errors become one clear line and exit code 2 (usage errors too)."""
    try:
        app()
    except MtlkitError as error:
        console.print(f"[red]error:[/] {error}", highlight=False)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
