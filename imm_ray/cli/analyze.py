"""imm-ray analyze: layer importance and layer weight change, each written as a CSV and a PNG bar plot.

User errors (missing folders, pickle-only or mismatched checkpoints, an unknown set, a set without reference
solutions) end with one line on stderr and exit code 2, no traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from imm_ray.cli.app import analyze_app
from imm_ray.cli.errors import fail

if TYPE_CHECKING:
    import pandas as pd

T = TypeVar("T")


def _or_exit(action: Callable[[], T], extra: tuple[type[Exception], ...] = ()) -> T:
    """Run ``action``; a user error (the analysis' own, a missing file, or ``extra``) ends with exit code 2.

    imm_ray.analysis (torch, transformers) is imported here, not at module level, so ``imm-ray --help`` and the
    other commands do not pay for it.
    """
    from imm_ray.analysis import AnalysisError

    try:
        return action()
    except (AnalysisError, FileNotFoundError, *extra) as error:
        fail(str(error))


def _load_pairs(data: str, split: str, data_dir: Path | None, limit: int | None) -> list[tuple[str, str]]:
    """(prompt, reference response) pairs of a registered set; every problem needs a reference solution."""
    from imm_ray.data.prompts import build_prompt, reference_response
    from imm_ray.data.registry import load_set

    # The registry raises DataError (a ValueError) for unknown, unreadable or unreachable sets.
    problems = _or_exit(lambda: load_set(data, split=split, data_dir=data_dir, limit=limit), (ValueError, KeyError))
    pairs = [(build_prompt(p.question), reference_response(p)) for p in problems]
    missing = [p.id for p, (_, response) in zip(problems, pairs) if response is None]
    if missing:
        fail(
            f"set {data!r} ({split}): {len(missing)} of {len(pairs)} problems have no reference solution "
            f"(first: {missing[0]}); layer importance needs one for every problem"
        )
    return pairs


def _write_outputs(df: pd.DataFrame, column: str, out: Path, title: str) -> None:
    """Write ``<column>.csv`` and ``<column>.png`` into ``out`` and print the table."""
    from imm_ray import analysis

    csv_path = analysis.write_layer_csv(df, out / f"{column}.csv")
    png_path = analysis.plot_layers(df, column, out / f"{column}.png", title)
    table = Table()
    table.add_column("layer", justify="right")
    table.add_column(column.replace("_", " "), justify="right")
    for layer, value in zip(df["layer"], df[column]):
        table.add_row(str(layer), f"{value:.6g}")
    console = Console(highlight=False, soft_wrap=True)
    console.print(title)
    console.print(table)
    console.print(f"wrote {csv_path} and {png_path}")


@analyze_app.command("importance")
def importance(
    model: Annotated[Path, typer.Option(help="HF model folder (safetensors).")],
    data: Annotated[str, typer.Option(help="Registered data set whose reference solutions form D.")],
    split: Annotated[str, typer.Option(help="Split of the set.")] = "train",
    data_dir: Annotated[Path | None, typer.Option(help="Folder holding local copies of the sets.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Use the first N problems only.")] = None,
    out: Annotated[Path, typer.Option(help="Folder for importance.csv and importance.png.")] = Path("."),
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    max_length: Annotated[int, typer.Option(min=2, help="Tokens per (prompt, response) pair.")] = 2048,
    device: Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda.")] = "cpu",
) -> None:
    """Layer importance I^n = Σ|∂L/∂W ⊙ W| over the weight matrices of each layer (paper's Figure 3)."""
    from imm_ray import analysis

    _or_exit(lambda: analysis.checkpoint_files(model))  # a bad model folder fails before the set is loaded
    pairs = _load_pairs(data, split, data_dir, limit)
    df = _or_exit(
        lambda: analysis.layer_importance(model, pairs, batch_size=batch_size, max_length=max_length, device=device)
    )
    _write_outputs(df, "importance", out, f"Layer importance: {model.name} on {data} ({split}, {len(pairs)} pairs)")


@analyze_app.command("weight-change")
def weight_change(
    before: Annotated[Path, typer.Option(help="HF model folder before fine-tuning (e.g. the base).")],
    after: Annotated[Path, typer.Option(help="HF model folder after fine-tuning (e.g. the SFT model).")],
    out: Annotated[Path, typer.Option(help="Folder for weight_change.csv and weight_change.png.")] = Path("."),
) -> None:
    """Layer weight change ΔW^n = Σ_k ‖W_after − W_before‖_F over the weight matrices (paper's Figure 4)."""
    from imm_ray import analysis

    df = _or_exit(lambda: analysis.weight_change(before, after))
    _write_outputs(df, "weight_change", out, f"Layer weight change: {before.name} → {after.name}")
