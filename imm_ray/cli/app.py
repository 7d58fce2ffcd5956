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
app.add_typer(analyze_app, name="analyze")
