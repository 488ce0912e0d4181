"""The ``mtlkit`` command line (typer). Every command goes through the same Python API."""

from __future__ import annotations

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


@reproduce_app.command("mmoe-synthetic")
def reproduce_mmoe_synthetic(
    profile: str = typer.Option("quick", help="quick (minutes) or paper (the paper's sizes and run counts; hours, resumable)."),
    seeds: Optional[int] = typer.Option(None, min=1, help="Independent runs per model and correlation (default: the profile's)."),
    out: Path = typer.Option(Path("runs/mmoe-synthetic"), help="Output folder (resumes a sweep found there)."),
    correlations: Optional[str] = typer.Option(None, help="Comma-separated correlations, e.g. 1,0.9,0.5,0.1."),
    models: Optional[str] = typer.Option(None, help="Comma-separated model names (default: all six)."),
    steps: Optional[int] = typer.Option(None, min=1, help="Training steps per run (default: the profile's)."),
    jobs: int = typer.Option(0, min=0, help="Worker processes (0: one per CPU core)."),
) -> None:
    """The MMoE paper's synthetic experiment: loss vs task correlation, at equal parameter budgets."""
    import dataclasses

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mtlkit.experiments.mmoe_synthetic import PROFILES, run_mmoe_synthetic
    from mtlkit.reports.plots import model_label

    if profile not in PROFILES:
        raise MtlkitError(f"--profile: unknown {profile!r}; expected one of {sorted(PROFILES)}")
    changes = {}
    if seeds is not None:
        changes["seeds"] = seeds
    if steps is not None:
        changes["steps"] = steps
    if correlations:
        changes["correlations"] = tuple(_parse_floats(correlations, "--correlations"))
    if models:
        changes["models"] = tuple(m.strip() for m in models.split(",") if m.strip())
    config = dataclasses.replace(PROFILES[profile], **changes)
    console.print(f"[bold]mmoe-synthetic[/] profile={config.profile} seeds={config.seeds} steps={config.steps} "
                  f"correlations={list(config.correlations)} -> {out}")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        bar = progress.add_task("runs", total=None)

        def on_progress(done: int, total: int, what: str) -> None:
            progress.update(bar, completed=done, total=total, description=what)

        result = run_mmoe_synthetic(config, out, jobs=jobs or os.cpu_count() or 1, on_progress=on_progress)

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
        verdict = "below" if claim["mmoe_mean"] < claim["shared_bottom_mean"] else "NOT below"
        console.print(f"corr {claim['correlation']:g}: MMoE mean {claim['mmoe_mean']:.4f} is {verdict} Shared-Bottom "
                      f"{claim['shared_bottom_mean']:.4f}; MMoE better in {claim['mmoe_wins']}/{claim['runs']} paired runs")
    console.print(f"wrote {out}/summary.csv, history.csv, table.md, loss_curves.png, final_loss_distribution.png")


def _parse_floats(text: str, option: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
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
