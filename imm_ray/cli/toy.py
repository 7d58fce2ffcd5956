"""``imm-ray toy build``, ``show`` and ``probe``: the embedded default's data and base model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from imm_ray.cli.app import toy_app
from imm_ray.cli.errors import fail
from imm_ray.data.toy import STEP_LINE, TOY_SETS, ToyMixture, load_toy
from imm_ray.toy import TOY_MODEL_DIR

_console = Console()


@toy_app.command("build")
def build(
    out: Path = typer.Option(TOY_MODEL_DIR, help="Model folder to write (an HF folder)."),
    seed: int = typer.Option(0, help="Seed of the data stream, tokenizer corpus and initialisation."),
    tokens: int = typer.Option(6_000_000, help="Token budget of the cosine schedule (and the most trained)."),
    minutes: float | None = typer.Option(None, help="Wall-clock cap; a build stopped by it is not reproducible."),
    target_id_accuracy: float = typer.Option(
        0.4, help="Stop at the first periodic eval with greedy ID pass@1 >= this (0: train the full budget)."
    ),
    id_share: float = typer.Option(
        0.1, help="Share of the in-domain family in the pretraining mixture (the OOD families split the rest)."
    ),
    init: Path | None = typer.Option(
        None, help="Continue pretraining this toy folder (its tokenizer and weights) instead of starting from scratch."
    ),
    lr: float = typer.Option(2e-3, help="Peak learning rate (warm-up, then cosine to a tenth of it)."),
    device: str = typer.Option("cpu", help="torch device to train on."),
    overwrite: bool = typer.Option(False, help="Replace an existing folder."),
) -> None:
    """Pretrain the toy tokenizer and model from scratch (or continue --init) and write them, with a build record."""
    from imm_ray.toy.pretrain import RECORD_NAME, PretrainSpec, build_toy  # torch: imported only when used

    try:
        if not 0 < id_share < 1:
            raise ValueError(f"--id-share must be in (0, 1), got {id_share}")
        rest = (1 - id_share) / 2
        mixture = ToyMixture(((TOY_SETS[0], id_share), (TOY_SETS[1], rest), (TOY_SETS[2], rest)))
        spec = replace(
            PretrainSpec(), seed=seed, tokens=tokens, max_minutes=minutes, device=device, lr=lr,
            target_id_accuracy=target_id_accuracy or None, mixture=mixture, init=None if init is None else str(init),
        )
        record = build_toy(spec, out, overwrite=overwrite)
    except (ValueError, FileExistsError) as error:
        fail(str(error))
    _console.print(f"wrote {out} ({record.parameters:,} parameters, {record.tokens_seen:,} tokens, "
                   f"{record.wall_seconds:.0f} s, stopped by {record.stopped_by}); record: {out / RECORD_NAME}")
    if record.parent is not None:
        _console.print(f"  continued from {record.parent['folder']} "
                       f"({record.parent['record']['tokens_seen']:,} tokens before these)")
    for accuracy in record.accuracies:
        _console.print(f"  {accuracy.set_name}: pass@1 {accuracy.pass_at_1:.1%} "
                       f"({accuracy.samples} samples at T={accuracy.temperature}, {accuracy.questions} questions)")
    if record.id_train_coverage is not None:
        _console.print(f"  ID train coverage at k={record.id_train_coverage.samples}: "
                       f"{record.id_train_coverage.coverage:.1%}")


@toy_app.command("show")
def show(
    n: int = typer.Option(2, min=1, help="Problems per family."),
    split: str = typer.Option("train", help="train or test."),
    seed: int = typer.Option(0, help="Data seed."),
) -> None:
    """Print a few problems of each family with their reference solutions."""
    for name in TOY_SETS:
        try:
            problems = load_toy(name, split, n, seed)
        except ValueError as error:
            fail(str(error))
        _console.rule(name)
        for problem in problems:
            _console.print(f"[bold]{problem.id}[/bold]  {problem.question}", highlight=False)
            _console.print(problem.solution or "", highlight=False)
            _console.print()


@toy_app.command("probe")
def probe(
    model: Path = typer.Option(TOY_MODEL_DIR, help="Toy model folder to probe."),
    n: int = typer.Option(60, min=1, help="Test questions per family."),
    seed: int = typer.Option(0, help="Data seed."),
) -> None:
    """Which decisions of a step line the model has learned: teacher-forced probability of the gold token at
    each field (person, running total, sign, amount, result), per family. 1.00 is learned, 0.50 a coin flip
    for the sign, 1/16 for a person."""
    from imm_ray.toy.check import load_model  # torch: imported only when used
    from imm_ray.stats import BOOTSTRAP_METHOD
    from imm_ray.toy.probe import field_probabilities

    if not (model / "config.json").is_file():
        fail(f"--model {model}: no config.json (not a model folder)")
    loaded, tokenizer = load_model(model)
    table = Table(title=f"teacher-forced P(gold token) per field [95% interval], {n} test questions per family",
                  caption=f"interval: {BOOTSTRAP_METHOD}")
    table.add_column("family", no_wrap=True)
    for field in STEP_LINE.groupindex:
        table.add_column(field, justify="right")
    table.add_column("step lines", justify="right")
    for name in TOY_SETS:
        results = field_probabilities(loaded, tokenizer, load_toy(name, "test", n, seed))
        table.add_row(name, *(f"{r.mean:.2f} [{r.low:.2f}, {r.high:.2f}]" for r in results), str(results[0].count))
    _console.print(table)
