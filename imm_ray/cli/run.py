"""``imm-ray run``: the whole iteration loop for every configured strategy."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from imm_ray.cli.app import app
from imm_ray.cli.errors import user_errors

DEFAULT_CONFIG = Path("configs/toy.yaml")


@app.command("run")
def run(
    config: Path = typer.Argument(DEFAULT_CONFIG, help="YAML experiment config (default: the embedded toy)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a field, e.g. --set merge.alpha=0.3 (repeatable)."),
) -> None:
    """Run T iterations of self-improvement for each strategy, then write runs/<name>/report.md."""
    from imm_ray.config import load_config
    from imm_ray.loop import IterationLoop

    console = Console()
    with user_errors():
        path = config if config.exists() or config != DEFAULT_CONFIG else None  # defaults = the toy config
        cfg = load_config(path, overrides)
        result = IterationLoop(cfg, console).run()
    console.print(_rich_table(result.table, f"pass@{cfg.eval.k[0]} (%)"))
    console.print(f"Report: {result.run_dir / 'report.md'}   wall time {result.seconds:.0f} s")


def _rich_table(frame, title: str) -> Table:
    table = Table(title=title)
    shown = frame.drop(columns=["strategy", "iteration", "role"])
    for column in shown.columns:
        table.add_column(str(column), justify="left" if column == "model" else "right")
    for _, row in shown.iterrows():
        table.add_row(str(row["model"]), *[f"{row[c]:.1f}" for c in shown.columns[1:]])
    return table
