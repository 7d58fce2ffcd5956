"""``imm-ray status RUN_DIR``: what a run has done and what it has left, and the history of its invocations."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from imm_ray.cli.app import app
from imm_ray.cli.errors import user_errors


@app.command("status")
def status(
    run_dir: Path = typer.Argument(..., help="A run folder (runs/<name>), holding the config.yaml the run saved."),
) -> None:
    """List every stage of a run (done / pending, fingerprint, time) from its saved config; start nothing."""
    from imm_ray.config import ConfigError, load_config
    from imm_ray.loop import IterationLoop, read_history

    console = Console()
    with user_errors():
        config_file = run_dir / "config.yaml"
        if not config_file.is_file():
            raise ConfigError(f"{run_dir} is not a run folder: it has no config.yaml")
        loop = IterationLoop(load_config(config_file), console, run_dir=run_dir)
        events = loop.plan()
    table = Table(title=f"stages of {run_dir}")
    for column in ("stage", "kind", "fingerprint", "status", "seconds"):
        table.add_column(column, justify="right" if column == "seconds" else "left")
    for event in events:
        style = "green" if event.status == "done" else "yellow"
        seconds = "" if event.seconds is None else f"{event.seconds:.1f}"
        table.add_row(escape(event.link), event.kind, event.fingerprint[:12], f"[{style}]{event.status}[/]", seconds)
    console.print(table)
    done = sum(e.status == "done" for e in events)
    console.print(f"{done} of {len(events)} stages done, {len(events) - done} pending")
    history = read_history(run_dir)
    if history:
        runs = Table(title="invocations")
        for column in ("started", "wall s", "computed", "reused", "command"):
            runs.add_column(column)
        for entry in history:
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["started"]))
            runs.add_row(started, f"{entry['seconds']:.0f}", str(entry["computed"]), str(entry["reused"]),
                         escape(" ".join(entry.get("argv", []))[-60:]))
        console.print(runs)
