"""``imm-ray eval``: pass@k of one model on any registered data sets, through the loop's Ray Data engine."""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer
from rich.console import Console

from imm_ray.cli.app import app
from imm_ray.cli.errors import user_errors


def _split_list(text: str, what: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise typer.BadParameter(f"give at least one {what}")
    return items


@app.command("eval")
def evaluate(
    model: Path = typer.Option(..., "--model", help="HF model folder (safetensors)."),
    sets: str = typer.Option(..., "--sets", help="Comma-separated data sets, e.g. gsm8k,mawps,svamp."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Folder holding <set>/<split>.jsonl files."),
    split: str = typer.Option("test", "--split"),
    samples: int = typer.Option(4, "--samples", min=1, help="Samples per question (M)."),
    k: str = typer.Option("1,4", "--k", help="Comma-separated k values for pass@k (each <= samples)."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="First N questions of each set."),
    temperature: float = typer.Option(0.6, "--temperature", min=0.0),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", min=1),
    num_shots: int = typer.Option(0, "--num-shots", min=0, help="Few-shot exemplars in the prompt (paper: 10)."),
    engine: str = typer.Option("auto", "--engine", help="auto | transformers | vllm"),
    actors: int = typer.Option(1, "--actors", min=1, help="Generation actors in the pool."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampling (the loop's eval.seed)."),
    out: Path = typer.Option(Path("eval_out"), "--out", help="Folder for per-set JSON, metrics.csv and metrics.md."),
    verbose: bool = typer.Option(False, "--verbose", help="Also show Ray's and the workers' own output "
                                 "(always kept in OUT/logs/)."),
) -> None:
    """Sample answers, grade them, and report pass@k per set (JSON per set, a CSV and a markdown table)."""
    from actors.cluster import ray_session
    from imm_ray.console import DRIVER_LOG, RunView, output_to
    from imm_ray.data.registry import load_set
    from imm_ray.loop import stage_error
    from imm_ray.preflight import prepare_eval, resolve_model

    console = Console()
    ks = [int(x) for x in _split_list(k, "k")]
    names = _split_list(sets, "data set")
    view = RunView(console, verbose=verbose)
    logs = out / "logs"
    with user_errors():
        config = _config(model, names, data_dir, split, samples, ks, limit, temperature, max_new_tokens,
                         num_shots, engine, actors, seed)
        # the user's model folder and the sets before a cluster starts: data that is not local fails here, at once
        resolve_model("--model", str(model), trust_remote_code=False)
        for name in names:
            load_set(name, split, data_dir=data_dir, limit=limit, seed=config.data.seed)
        view.header(f"imm-ray eval {model.name} on {', '.join(names)}", logs)
        capture = output_to(logs / DRIVER_LOG, console) if not verbose else contextlib.nullcontext()
        with capture, ray_session(logs, verbose=verbose):
            prepared = prepare_eval(config)
            with view.stage(f"evaluate {model.name}") as progress:
                try:
                    metrics = _run(config, prepared, out, progress)
                except Exception as error:
                    raise stage_error(f"evaluation of {model}", error, logs / "eval.traceback.txt") from error
    console.print(_markdown(metrics), markup=False)
    console.print(f"written to {out}", highlight=False, soft_wrap=True)


def _config(model, names, data_dir, split, samples, ks, limit, temperature, max_new_tokens, num_shots, engine,
            actors, seed):
    """The eval options as the same typed config the loop uses, so validation and errors are the same."""
    from imm_ray.config import validate

    return validate({
        "experiment": {"strategies": ["vanilla"]},
        "model": {"path": str(model)},
        "data": {"train_set": names[0], "eval_sets": names, "eval_split": split, "eval_limit": limit,
                 "data_dir": str(data_dir) if data_dir else None},
        "generation": {"engine": engine, "max_new_tokens": max_new_tokens},
        "eval": {"samples": samples, "k": ks, "temperature": temperature, "num_shots": num_shots, "seed": seed},
        "resources": {"generation_actors": actors},
    }, "eval options")


def _run(config, prepared, out: Path, progress):
    import json

    from actors.evaluation import INTERVAL_METHOD, evaluate_model

    samples, metrics = evaluate_model(
        prepared.eval_sets, prepared.eval_prompts, prepared.engine_spec(prepared.base.path), prepared.eval_plan(),
        prepared.generation_pool, config.eval.k, progress,
    )
    out.mkdir(parents=True, exist_ok=True)
    samples.to_parquet(out / "samples.parquet", index=False)
    metrics.to_csv(out / "metrics.csv", index=False)
    for record in metrics.to_dict(orient="records"):
        (out / f"{record['set']}.json").write_text(json.dumps(
            {**record, "model": str(config.model.path), "interval": f"95% {INTERVAL_METHOD}"}, indent=2))
    (out / "metrics.md").write_text(_markdown(metrics))
    return metrics


def _markdown(metrics) -> str:
    """pass@k in percent as ``value [low, high]`` per set, with its counts and the interval method stated."""
    from actors.evaluation import INTERVAL_METHOD
    from imm_ray.report import markdown_table

    ks = [c for c in metrics.columns if c.startswith("pass@") and not c.endswith(("_low", "_high"))]
    rows = [[str(row["set"]), f"{int(row['questions'])} × {int(row['samples'])}",
             *[_cell(row, k) for k in ks]] for _, row in metrics.iterrows()]
    table = markdown_table(["set", "questions × samples", *[f"{k} (%)" for k in ks]], rows)
    return (f"{table}\n\n95% intervals in brackets: {INTERVAL_METHOD}; pass@k is the unbiased estimator "
            "averaged over each set's questions.\n")


def _cell(row, k: str) -> str:
    value = f"{100 * row[k]:.1f}"
    if f"{k}_low" not in row:
        return value
    return f"{value} [{100 * row[f'{k}_low']:.1f}, {100 * row[f'{k}_high']:.1f}]"
