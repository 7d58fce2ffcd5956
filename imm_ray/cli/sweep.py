"""``imm-ray sweep``: a Ray Tune sweep over merge α, drop rate and iterations, ending in the paper's Table 3."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import typer
from rich import box
from rich.console import Console
from rich.table import Table

from imm_ray.cli.app import app
from imm_ray.cli.errors import user_errors


@app.command("sweep")
def sweep(
    config: Path = typer.Argument(..., help="YAML experiment config with a sweep section, e.g. configs/table3.yaml."),
    overrides: list[str] = typer.Option([], "--set", help="Override a field, e.g. --set sweep.alpha=[0.3,0.5]."),
    seeds: str | None = typer.Option(
        None, "--seeds", help="Replicates, e.g. --seeds 0,1,2: the experiment runs once per seed (experiment.seeds)."),
    fresh: bool = typer.Option(
        False, "--fresh",
        help="Start a new Tune experiment instead of resuming the one in the sweep folder (it is moved aside); "
             "finished stages in the shared stage cache are still reused.",
    ),
    verbose: bool = typer.Option(False, "--verbose", help="Also show Tune's, Ray's and the trials' own output "
                                 "(always kept under the sweep folder's logs/ and trials/)."),
) -> None:
    """Run (or resume) the sweep; write table3.md/.csv/.png and trials.csv into <output_dir>/<name>/."""
    from imm_ray.config import load_config, seeds_override
    from imm_ray.console import RunView
    from imm_ray.report import ALPHA_CONVENTION
    from tune.sweep import run_sweep

    console = Console()
    with user_errors():
        cfg = load_config(config, [*overrides, *seeds_override(seeds)])
        result = run_sweep(cfg, RunView(console, verbose=verbose), fresh=fresh, capture_output=True)
    console.print(_rich_table(result.table, f"Table 3: pass@{cfg.eval.k[0]} (%)"))
    console.print(ALPHA_CONVENTION, style="dim", markup=False)
    failed = [o for o in result.outcomes if not o.ok]
    for outcome in failed:
        why = outcome.error if outcome.status == "failed" else "unfinished; run the same command again to resume"
        console.print(f"trial {outcome.params.label}: {why}", style="red", markup=False)
    acc = result.accounting
    console.print(
        f"Table 3: {result.files.markdown}   wall time {result.seconds:.0f} s; stage work {acc.computed_seconds:.0f} s "
        f"with the shared cache vs {acc.unshared_seconds:.0f} s unshared"
    )
    if failed:
        raise typer.Exit(1)


def _rich_table(frame: pd.DataFrame, title: str) -> Table:
    """Numbers and headers never truncated; on a narrow terminal the set names fold onto two lines instead."""
    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, collapse_padding=True)
    table.add_column(str(frame.index.name or "set"), overflow="fold")
    for column in frame.columns:
        table.add_column(str(column), justify="right", no_wrap=True, min_width=len(str(column)))
    for name, row in frame.iterrows():
        table.add_row(str(name), *["–" if pd.isna(v) else f"{v:.1f}" for v in row])
    return table
