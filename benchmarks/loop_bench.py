"""Loop benchmark: each stage kind's wall time in the real loop beside its floor done by one warm process.

Runs (unless ``--run-dir`` names a finished run) ``imm-ray run configs/toy.yaml --set experiment.name=bench
[--set ...]`` from scratch, reads each stage's completion record (``runs/<name>/_stages/*/_COMPLETE.json``,
"seconds") and measures, on the same inputs, the floor of each kind in warm processes (start-up excluded):

- generate / eval: the transformers engine (the spec the loop builds: ``EngineSpec(kind="transformers")``, dtype
  and attention resolved on this machine) on the stage's own prompts, grouped as the pipeline groups them
  (temperature, sample count), split over one process per core, all of a process's prompts in one call;
- sft: a plain single-process torch loop (AdamW, same model, same pairs, same global batch per optimizer step,
  same epochs, fp32, torch threads = cores) against the stage's own ``train_seconds`` and tokens (training log);
- merge: the safetensors I/O floor (read base and SFT model, write one).

Fixed start-up per stage = stage seconds − floor (for SFT also the training log's timeline). Timing is
``time.perf_counter`` only; the load average (``/proc/loadavg``) is printed before and after.

Usage: python benchmarks/loop_bench.py [--run-dir runs/bench] [--set section.field=value ...] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DOC = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- loop-bench:start -->", "<!-- loop-bench:end -->"


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def records(run_dir: Path) -> list[tuple[Path, dict]]:
    found = []
    for record in sorted((run_dir / "_stages").glob("*/_COMPLETE.json")):
        found.append((record.parent, json.loads(record.read_text())))
    return found


def stage_folder(run_dir: Path, fingerprint: str) -> Path | None:
    """The stage folder of an argument's fingerprint (the completion records name arguments by fingerprint)."""
    return next((f for f in (run_dir / "_stages").glob(f"*-{fingerprint}") if f.is_dir()), None)


def argument_model(run_dir: Path, record: dict, base_model: str) -> str:
    """The model a generate/eval stage sampled: an SFT or merge stage's folder, or the base."""
    folder = stage_folder(run_dir, record["inputs"]["arguments"].get("model", ""))
    return str(folder) if folder is not None and (folder / "config.json").exists() else base_model


def _engine_worker(args: tuple[dict, list[tuple[float, int, list[str]]], int]) -> float:
    """One warm process: build the engine (untimed), then time its share of every (temperature, n) group."""
    spec, groups, max_new_tokens = args
    from actors.engines import EngineSpec, SamplingRequest, make_engine
    from imm_ray.data.format import STOP_STRINGS

    engine = make_engine(EngineSpec(**spec))
    engine.generate(groups[0][2][:2], SamplingRequest(n=1, temperature=0.6, max_new_tokens=4, seed=0))
    started = time.perf_counter()
    for temperature, n, prompts in groups:
        engine.generate(prompts, SamplingRequest(n=n, temperature=temperature, max_new_tokens=max_new_tokens,
                                                 seed=1, stop=STOP_STRINGS))
    return time.perf_counter() - started


def generation_floor(folder: Path, spec: dict, max_new_tokens: int, cores: int) -> float:
    """The stage's own engine spec (dtype, attention, KV cache as the loop resolved them), one warm process per
    core with that spec's threads."""
    import pandas as pd

    frame = pd.read_parquet(folder / "samples.parquet", columns=["question_id", "prompt", "temperature"])
    counts = frame.groupby(["temperature", "question_id", "prompt"]).size().reset_index(name="n")
    shares: list[list[tuple[float, int, list[str]]]] = [[] for _ in range(cores)]
    for (temperature, n), group in counts.groupby(["temperature", "n"]):
        prompts = list(group["prompt"])
        for core in range(cores):
            part = prompts[core::cores]
            if part:
                shares[core].append((float(temperature), int(n), part))
    context = multiprocessing.get_context("spawn")
    with context.Pool(cores) as pool:
        return max(pool.map(_engine_worker, [(spec, share, max_new_tokens) for share in shares if share]))


def sft_floor(pairs: Path, model_path: str, config: dict, cores: int, global_batch: int) -> tuple[float, int]:
    """A plain torch loop over the same pairs and steps (one process, ``cores`` threads, the stage's global batch
    in micro-batches of the per-device size, the loss as the worker weighs it): (seconds in the loop, tokens)."""
    import pandas as pd
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.sft.batches import collate, epoch_order, rank_micro_batches, response_tokens, step_members
    from imm_ray.tokens import encode_pair

    torch.set_num_threads(cores)
    sft = config["sft"]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    frame = pd.read_parquet(pairs, columns=["prompt", "response"])
    examples = [encode_pair(tokenizer, p, r, sft["max_length"]) for p, r in zip(frame["prompt"], frame["response"])]
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=sft["learning_rate"])
    tokens, started = 0, time.perf_counter()
    for epoch in range(sft["epochs"]):
        order = epoch_order(len(examples), seed=0, epoch=epoch)
        for step in range(-(-len(examples) // global_batch)):
            members = step_members(order, step, global_batch)
            step_tokens = sum(response_tokens(examples[i]) for i in members)
            for batch in rank_micro_batches(members, rank=0, world=1, batch_size=sft["per_device_batch_size"]):
                tensors = collate([examples[i] for i in batch], tokenizer.pad_token_id)
                tokens += int(tensors["attention_mask"].sum())
                model(**tensors, num_items_in_batch=step_tokens).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
    return time.perf_counter() - started, tokens


def io_floor(base: Path, sft: Path, out: Path) -> float:
    from safetensors import safe_open
    from safetensors.torch import save_file

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    read: list[dict] = []
    for folder in (base, sft):
        tensors = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), "pt") as handle:
                tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
        read.append(tensors)
    save_file(read[1], out / "model.safetensors")  # a merge writes one model of the same shape
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, default=None, help="a finished run to read instead of running one")
    parser.add_argument("--set", action="append", default=[], help="extra --set for the run")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    before = load()
    cores = len(os.sched_getaffinity(0))
    run_dir = args.run_dir
    wall = None
    if run_dir is None:
        run_dir = ROOT / "runs" / "bench"
        if run_dir.exists():
            raise SystemExit(f"{run_dir} exists: remove it or pass --run-dir")
        command = [str(Path(sys.executable).parent / "imm-ray"), "run", "configs/toy.yaml", "--set",
                   "experiment.name=bench", *[x for s in args.set for x in ("--set", s)]]
        started = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - started
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    base_model = str(ROOT / "imm_ray" / "assets" / "toy") if config["model"]["path"] == "toy" else config["model"]["path"]
    rows = []
    for folder, record in records(run_dir):
        kind, seconds = record["kind"], record["seconds"]
        floor, note = None, ""
        if kind in ("generate", "eval"):
            spec = {**record["inputs"]["values"]["engine"], "model_path": argument_model(run_dir, record, base_model)}
            tokens = config["generation"]["max_new_tokens"] if kind == "generate" else (
                config["eval"].get("max_new_tokens") or config["generation"]["max_new_tokens"])
            floor = generation_floor(folder, spec, tokens, cores)
            note = f"engine ({spec['dtype']}, {spec['attention']}, {spec['kv_cache']} cache), {cores} warm processes"
        elif kind == "sft":
            log = json.loads((folder / "training_log.json").read_text())
            pairs = stage_folder(run_dir, record["inputs"]["arguments"]["pairs"]) / "pairs.parquet"
            floor, tokens = sft_floor(pairs, base_model, config, cores, log["global_batch"])
            ray_rate, plain_rate = log["tokens"] / log["train_seconds"], tokens / floor
            note = (f"plain torch loop ({cores} threads); stage's step loop {log['train_seconds']:.2f} s, tokens/s "
                    f"{ray_rate:,.0f} vs {plain_rate:,.0f} = {ray_rate / plain_rate:.2f}×; timeline "
                    + ", ".join(f"{k} {v:.1f}" for k, v in log["timeline"].items()))
        elif kind == "merge":
            tuned = stage_folder(run_dir, record["inputs"]["arguments"]["sft"])
            floor = io_floor(Path(base_model), tuned, Path("/tmp") / f"loop-bench-io-{os.getpid()}")
            note = "safetensors read 2, write 1"
        rows.append((kind, folder.name, seconds, floor, note))
    after = load()
    lines = ["| stage | loop s | floor s | loop / floor | start-up s (loop − floor) | floor, notes |",
             "|---|---:|---:|---:|---:|---|"]
    for kind, name, seconds, floor, note in rows:
        if floor is None:
            lines.append(f"| {kind} ({name[-6:]}) | {seconds:.1f} | | | | |")
        else:
            lines.append(f"| {kind} ({name[-6:]}) | {seconds:.1f} | {floor:.2f} | {seconds / floor:.1f}× | "
                         f"{seconds - floor:.1f} | {note} |")
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    head = (f"Measured {date}, {cores} cores, run `{run_dir.name}`"
            + (f" (whole command {wall:.0f} s)" if wall else "")
            + f"; load average (1, 5, 15 min) {before} before the floors, {after} after.")
    report = "\n".join([head, "", *lines])
    print(report)
    if not args.no_write:
        text = DOC.read_text()
        body = f"{START}\n{report}\n{END}"
        if START in text:
            text = text[: text.index(START)] + body + text[text.index(END) + len(END):]
        else:
            text = text.rstrip() + "\n\n## Loop stages against their floors\n\n" + body + "\n"
        DOC.write_text(text)


if __name__ == "__main__":
    main()
