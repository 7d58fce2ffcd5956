"""The typer application every command module registers itself on."""

import typer

app = typer.Typer(
    name="imm-ray",
    help="Iterative Model Merging for self-improving LLM reasoners, on Ray.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
toy_app = typer.Typer(help="The embedded default: synthetic problems, tokenizer and tiny model.", no_args_is_help=True)
analyze_app = typer.Typer(help="Layer importance and weight-change analysis.", no_args_is_help=True)
app.add_typer(toy_app, name="toy")


def _print_version(value: bool) -> None:
    if value:
        from imm_ray import __version__

        typer.echo(f"imm-ray {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Iterative Model Merging for self-improving LLM reasoners, on Ray."""

app.add_typer(analyze_app, name="analyze")
