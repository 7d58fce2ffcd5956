"""imm-ray merge: one merge of HF model folders (the same call the iteration loop makes): on the Ray actor pool
where a cluster runs or is addressed, else in local processes running the same engine code."""

from __future__ import annotations

from pathlib import Path

import typer
from pydantic import ValidationError

from imm_ray.cli.app import app
from imm_ray.cli.errors import user_errors
from imm_ray.merge.errors import MergeError
from imm_ray.merge.options import DEFAULT_CHUNK_ELEMENTS, MergeOptions, describe_errors


@app.command("merge")
def merge(
    base: Path = typer.Option(..., "--base", help="The ORIGINAL base model θ (HF folder, safetensors)."),
    finetuned: list[Path] = typer.Option(..., "--finetuned", help="Fine-tuned model; repeat for ties/dare-ties."),
    out: Path = typer.Option(..., "--out", help="Output HF folder (must not exist unless --overwrite)."),
    alpha: float = typer.Option(..., "--alpha", help="Weight of the ORIGINAL base (Eq. 6): 1 = base."),
    drop_rate: float = typer.Option(..., "--drop-rate", help="DARE drop rate p (TIES: share trimmed)."),
    seed: int = typer.Option(..., "--seed", help="Seed of the DARE masks."),
    previous: Path | None = typer.Option(None, "--previous", help="θ^t, start of the fine-tune (default: base)."),
    iteration: int = typer.Option(0, "--iteration", help="Iteration t (enters the masks' seed)."),
    workers: int | None = typer.Option(None, "--workers",
                                       help="Ray actors or local processes (default: every CPU of the cluster/machine)."),
    backend: str = typer.Option("auto", "--backend", help="auto (Ray if running or RAY_ADDRESS is set, else local "
                                "processes), ray, or local."),
    method: str = typer.Option("imm", "--method", help="imm, iimm, linear, task-arithmetic, ties, dare-ties."),
    exclude: str | None = typer.Option(None, "--exclude", help="Regex of tensors that keep their full delta."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, bfloat16, float16 or float32."),
    importance: Path | None = typer.Option(None, "--importance", help="IIMM layer-importance CSV (layer,importance)."),
    chunk_elements: int = typer.Option(DEFAULT_CHUNK_ELEMENTS, "--chunk-elements", help="Elements per chunk."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
) -> None:
    """Merge fine-tuned model(s) back into the base: out = α·base + (1−α)·(prev + DARE_p(ft − prev))."""
    with user_errors():
        try:
            options = MergeOptions(
                base=base, finetuned=tuple(finetuned), previous=previous, out=out, method=method, alpha=alpha,
                drop_rate=drop_rate, seed=seed, iteration=iteration, exclude=exclude, dtype=dtype,
                overwrite=overwrite, importance=importance, chunk_elements=chunk_elements, workers=workers,
            )
        except ValidationError as error:
            raise MergeError(f"invalid merge options: {describe_errors(error)}") from None
        if backend not in ("auto", "ray", "local"):
            raise MergeError(f"invalid merge options: backend: {backend!r} is not one of auto, ray, local")
        from actors.merging import merge_models

        record = merge_models(options, backend=backend)  # type: ignore[arg-type]
    typer.echo(f"merged {record.tensors} tensors ({record.bytes_written / 1e9:.2f} GB) into {out} "
               f"in {record.seconds:.1f} s with {record.workers} worker(s); record: {out / 'merge_record.json'}")
