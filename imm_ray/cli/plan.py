"""``imm-ray plan CONFIG``: every stage of a run with its resources and the memory of each process, checked
against a cluster's node types before any work; which stages are done already.

The memory plan reads the models' config.json only (no weights, no data) and refuses, in one line with exit code 2,
a config one of whose stages cannot fit (imm_ray/memory/plan.py). The stage list is the loop's own declaration of
the run (``IterationLoop.plan``, as ``imm-ray status`` shows it): it resolves the models and loads the data, which
``--no-stages`` skips (a laptop without the data sets or the weights).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from imm_ray.cli.app import app
from imm_ray.cli.errors import user_errors

DRIVER_KINDS = {"sft_data": "driver: selects the kept pairs (pandas, no model)"}


@app.command("plan")
def plan(
    config: Path = typer.Argument(..., help="YAML experiment config."),
    overrides: list[str] = typer.Option([], "--set", help="Override a field, e.g. --set sft.max_length=1024."),
    cluster: str = typer.Option(
        "cluster.yaml", "--cluster",
        help="Node types to check against: a Ray cluster-launcher YAML, or 'live' (the Ray cluster at RAY_ADDRESS, "
             "plus the autoscaler's node types where the head node has them)."),
    stages: bool = typer.Option(True, "--stages/--no-stages",
                                help="List every stage with done/pending (resolves the models and loads the data)."),
    details: bool = typer.Option(False, "--details", help="Show what each process's memory is made of."),
) -> None:
    """The memory plan of a run: refuses a config that cannot fit, naming the stage and the shortfall."""
    from imm_ray.config import load_config
    from imm_ray.memory.plan import check_plan, gpu_memory_of, memory_plan

    console = Console()
    with user_errors():
        cfg = load_config(config, list(overrides))
        nodes = _node_types(cluster)
        memory = memory_plan(cfg, gpu_memory_of(nodes))
        _print_nodes(console, nodes, cluster)
        _print_plan(console, memory, details)
        check_plan(memory, nodes)
        console.print("[green]every stage fits[/] the node types above")
        if stages:
            _print_stages(console, cfg, memory)


def _node_types(cluster: str):
    from imm_ray.memory.nodes import autoscaler_node_types, cluster_yaml_node_types, live_node_types

    if cluster != "live":
        return cluster_yaml_node_types(cluster)
    from actors.cluster import ray_session

    with ray_session():
        return live_node_types() + autoscaler_node_types()


def _print_nodes(console: Console, nodes, source: str) -> None:
    from imm_ray.memory.plan import gib

    table = Table(title=f"node types ({source})")
    for column in ("node type", "most nodes", "CPUs", "GPUs", "memory per GPU", "heap (memory less object store)"):
        table.add_column(column, justify="left" if column == "node type" else "right")
    for node in nodes:
        gpu = "unknown" if node.gpus and node.gpu_memory_bytes is None else gib(node.gpu_memory_bytes or 0)
        table.add_row(escape(node.name), str(node.count), f"{node.cpus:g}", f"{node.gpus:g}",
                      gpu if node.gpus else "–", gib(node.memory_bytes))
    console.print(table)
    if any(n.gpus and n.gpu_memory_bytes is None for n in nodes):
        console.print("[yellow]GPUs of unknown size: GPU memory is not checked[/]")


def _print_plan(console: Console, memory, details: bool) -> None:
    from imm_ray.memory.plan import gib

    for name, shape in memory.shapes:
        count = shape.parameters()
        size = f"{count / 1e9:.2f}B" if count >= 1e8 else f"{count / 1e6:.1f}M"
        console.print(f"{escape(name)}: {size} parameters, {shape.layers} layers, hidden "
                      f"{shape.hidden}, heads {shape.heads}/{shape.kv_heads} kv, intermediate {shape.intermediate}, "
                      f"vocab {shape.vocab}, tied {shape.tied_embeddings} [dim]({escape(shape.source)})[/]")
    table = Table(title="memory plan (per process)")
    for column in ("stage", "how", "processes", "CPU", "GPU", "GPU memory", "host memory", "note"):
        table.add_column(column, justify="right" if column in ("processes", "CPU", "GPU") else "left")
    for stage in memory.stages:
        gpu = gib(stage.need.gpu_bytes) if stage.gpus else "–"
        table.add_row(escape(stage.label), escape(stage.what), str(stage.processes), f"{stage.cpus:g}",
                      f"{stage.gpus:g}", gpu, gib(stage.need.host_bytes), escape(stage.need.note))
    console.print(table)
    if details:
        for stage in memory.stages:
            parts = ", ".join(f"{escape(what)} {gib(size)}" for what, size in stage.need.parts)
            console.print(f"  {escape(stage.label)}: {parts}")


def _print_stages(console: Console, cfg, memory) -> None:
    from imm_ray.loop import IterationLoop
    from imm_ray.memory.plan import gib

    events = IterationLoop(cfg, console).plan()
    table = Table(title=f"stages of {cfg.run_dir}")
    for column in ("stage", "kind", "status", "processes × GPU memory / host memory"):
        table.add_column(column)
    for event in events:
        row = memory.row(event.kind, _role(event.link, cfg))
        sizes = (f"{row.processes} × {gib(row.need.gpu_bytes) if row.gpus else '–'} / {gib(row.need.host_bytes)}"
                 if row else DRIVER_KINDS.get(event.kind, ""))
        style = "green" if event.status == "done" else "yellow"
        table.add_row(escape(event.link), event.kind, f"[{style}]{event.status}[/]", sizes)
    console.print(table)
    done = sum(e.status == "done" for e in events)
    console.print(f"{done} of {len(events)} stages done (cached), {len(events) - done} to run")


def _role(link: str, cfg) -> str:
    """The model a stage runs: the teacher for the generation of a strategy whose teacher generates."""
    from imm_ray.strategies import STRATEGIES

    parts = Path(link).parts
    strategy = parts[1] if len(parts) > 1 and parts[0].startswith("seed_") else None
    teacher = strategy in STRATEGIES and STRATEGIES[strategy].teacher_generates and cfg.model.teacher is not None
    return "teacher" if teacher and parts[-1] == "generate" else "student"
