"""``imm-ray run``: the whole iteration loop for every configured strategy."""

from __future__ import annotations

from pathlib import Path

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from imm_ray.cli.app import app
from imm_ray.cli.errors import user_errors

DEFAULT_CONFIG = Path("configs/toy.yaml")


@app.command("run")
def run(
    config: Path = typer.Argument(DEFAULT_CONFIG, help="YAML experiment config (default: the embedded toy)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a field, e.g. --set merge.alpha=0.3 (repeatable)."),
    seeds: str | None = typer.Option(
        None, "--seeds", help="Replicates, e.g. --seeds 0,1,2: the experiment runs once per seed (experiment.seeds)."),
    verbose: bool = typer.Option(
        False, "--verbose", help="Also show Ray's and the workers' own output (always kept in runs/<name>/logs/)."),
) -> None:
    """Run T iterations of self-improvement for each strategy, then write runs/<name>/report.md and report.html."""
    from imm_ray.config import load_config, seeds_override
    from imm_ray.console import RunView
    from imm_ray.loop import IterationLoop

    console = Console()
    with user_errors():
        path = config if config.exists() or config != DEFAULT_CONFIG else None  # defaults = the toy config
        cfg = load_config(path, [*overrides, *seeds_override(seeds)])
        result = IterationLoop(cfg, RunView(console, verbose=verbose), capture_output=True).run()
    console.print(_rich_table(result.table, f"pass@{cfg.eval.k[0]} (%)"))
    console.print(f"Report: {result.run_dir / 'report.md'} (and report.html)   wall time {result.seconds:.0f} s",
                  highlight=False, soft_wrap=True)


def _rich_table(frame, title: str) -> Table:
    """The report's first-k table: ``value [low, high]`` (95% interval, percent, whole points for the bounds so
    four set columns fit 100 columns); the set names fold rather than the numbers."""
    from imm_ray.report import HIGH, LOW, set_columns

    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, collapse_padding=True)
    table.add_column("model", overflow="fold")
    names = set_columns(frame)
    for column in names:
        table.add_column(str(column), justify="right", overflow="fold")
    for _, row in frame.iterrows():
        table.add_row(str(row["model"]), *[_cell(row[c], row.get(c + LOW), row.get(c + HIGH)) for c in names])
    table.caption = "value [95% interval, bounds in whole points], pooled over seeds; report.md says how"
    return table


def _cell(value, low, high) -> str:
    import math

    if value is None or math.isnan(value):
        return "–"
    if low is None or math.isnan(low):
        return f"{value:.1f}"
    return f"{value:.1f} [{low:.0f}, {high:.0f}]"
