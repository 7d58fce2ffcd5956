"""Merge benchmark: imm-ray merge (local processes and Ray actors) against mergekit's dare_linear and the I/O floor.

Builds, once, a random Qwen2.5-0.5B-shaped (or ``--shape 1.5b``) bf16 model (two safetensors shards) and a
perturbed copy, then times whole processes on the same inputs (DARE p = 0.2, α = 0.5, i.e.
out = base + 0.5·DARE(ft − base)):

- ``imm-ray merge --workers 1`` and ``--workers 2`` with no Ray running (the default ``--backend auto`` then runs
  the engine in this process / 2 local processes), and ``--backend ray --workers 2`` (a local Ray started and
  stopped by the command, as before the local backend existed);
- ``mergekit-yaml`` with ``dare_linear`` (weight 0.5, density 0.8, no normalisation: the same formula);
- the I/O floor: read both models' tensors and write one model with the safetensors library;
- ``merge_models`` alone, in a process where Ray is already up (the merge itself).

Each run is a fresh process; wall time is the median of ``--repeats`` runs; peak RSS is the kernel's high-water mark
(VmHWM) of every process in the run's process tree (Ray's raylet, GCS and workers included), polled every 20 ms.
Figures go to stdout and, between markers, into the "Merge engine" section of docs/benchmarks.md.

Usage: python benchmarks/merge_bench.py [--shape 0.5b|1.5b] [--workdir DIR] [--repeats 3] [--no-write]
       [--mergekit-path DIR]   (mergekit installed with ``pip install --target DIR``, kept out of the venv)
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DOC = ROOT / "docs" / "benchmarks.md"
ALPHA, DROP_RATE, SEED = 0.5, 0.2, 0
# Qwen2.5 shapes (tensor names and sizes as the hub's configs give them); each with issue 10's whole-process goal
SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12),
}
WALL_GOAL = {"0.5b": 0.35, "1.5b": 0.5}


def markers(shape: str) -> tuple[str, str]:
    """The 0.5B section keeps its original markers; other shapes get their own."""
    tag = "merge-bench" if shape == "0.5b" else f"merge-bench-{shape}"
    return f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"


def build_pair(workdir: Path, shape: str = "0.5b") -> tuple[Path, Path]:
    """A random bf16 model with a Qwen2.5 shape's tensor names and sizes, and a perturbed copy (two shards each)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, Qwen2Config

    base, finetuned = workdir / "base", workdir / "finetuned"
    config = Qwen2Config(
        vocab_size=151936, **SHAPES[shape], num_key_value_heads=2, max_position_embeddings=32768,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, dtype="bfloat16", architectures=["Qwen2ForCausalLM"],
    )
    if (finetuned / "model.safetensors.index.json").is_file():
        for folder in (base, finetuned):
            config.to_json_file(folder / "config.json")
        return base, finetuned
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in AutoModelForCausalLM.from_config(config).named_parameters()}
    total = sum(shape.numel() for shape in shapes.values())
    halves: list[list[str]] = [[], []]
    seen = 0
    for name, shape in shapes.items():
        halves[int(seen >= total / 2)].append(name)
        seen += shape.numel()
    generator = torch.Generator().manual_seed(0)
    for folder in (base, finetuned):
        folder.mkdir(parents=True, exist_ok=True)
        config.to_json_file(folder / "config.json")
    weight_map = {}
    for number, names in enumerate(halves, start=1):
        file = f"model-{number:05d}-of-00002.safetensors"
        weights = {n: (torch.randn(shapes[n], generator=generator) * 0.02).to(torch.bfloat16) for n in names}
        save_file(weights, base / file, metadata={"format": "pt"})
        for n in names:
            weights[n] = (weights[n].float() + torch.randn(shapes[n], generator=generator) * 0.002).to(torch.bfloat16)
        save_file(weights, finetuned / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        del weights
    index = json.dumps({"metadata": {"total_size": total * 2}, "weight_map": weight_map}, indent=2)
    for folder in (base, finetuned):
        (folder / "model.safetensors.index.json").write_text(index)
    print(f"built {base} and {finetuned}: {total / 1e6:.0f}M parameters each", flush=True)
    return base, finetuned


IO_FLOOR = """
import json, sys
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
base, finetuned, out = map(Path, sys.argv[1:4])
out.mkdir()
for file in sorted(set(json.loads((base / "model.safetensors.index.json").read_text())["weight_map"].values())):
    with safe_open(base / file, "pt") as handle:
        read = {name: handle.get_tensor(name) for name in handle.keys()}
    with safe_open(finetuned / file, "pt") as handle:
        written = {name: handle.get_tensor(name) for name in handle.keys()}
    save_file(written, out / file, metadata={"format": "pt"})
    del read, written
"""

RAY_UP = """
import sys, time
import ray
ray.init(include_dashboard=False, log_to_driver=False)
from actors.merging import merge_models
from imm_ray.merge.options import MergeOptions
options = MergeOptions(base=sys.argv[1], finetuned=sys.argv[2], out=sys.argv[3], alpha={alpha}, drop_rate={p},
                       seed={seed}, workers=int(sys.argv[4]))
started = time.perf_counter()
merge_models(options)
print("MERGE_SECONDS", time.perf_counter() - started)
"""

MERGEKIT_CONFIG = """
merge_method: dare_linear
base_model: {base}
models:
  - model: {finetuned}
    parameters: {{weight: {weight}, density: {density}}}
parameters: {{normalize: false}}
dtype: bfloat16
"""


@dataclass
class Run:
    wall: float
    largest_rss_mib: float
    largest_process: str
    tree_rss_mib: float
    merge_seconds: float | None


def _status(pid: int) -> tuple[int, int, str] | None:
    """(VmHWM, VmRSS) in KiB and the process name, or None if it is gone."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    except (OSError, ValueError):
        return None
    if "VmHWM" not in fields:
        return None
    return int(fields["VmHWM"].split()[0]), int(fields["VmRSS"].split()[0]), fields["Name"].strip()


def _tree(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo += children.get(pid, [])
    return found


def measure(command: list[str], env: dict[str, str] | None = None) -> Run:
    """Run ``command`` as a fresh process; poll its whole process tree's memory until it exits."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, tuple[int, str]] = {}
    tree_peak = 0
    while process.poll() is None:
        total = 0
        for pid in _tree(process.pid):
            status = _status(pid)
            if status:
                hwm, rss, name = status
                peaks[pid] = max(peaks.get(pid, (0, name)), (hwm, name))
                total += rss
        tree_peak = max(tree_peak, total)
        time.sleep(0.02)
    wall = time.perf_counter() - started
    output = process.stdout.read() if process.stdout else ""
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{output[-3000:]}")
    hwm, name = max(peaks.values()) if peaks else (0, "?")
    merge_seconds = next((float(line.split()[1]) for line in output.splitlines() if line.startswith("MERGE_SECONDS")),
                         None)
    return Run(wall, hwm / 1024, name, tree_peak / 1024, merge_seconds)


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    return (f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, Linux {platform.release()}, "
            f"Python {platform.python_version()}")


def digest(folder: Path) -> str:
    hasher = hashlib.blake2b(digest_size=16)
    for file in sorted(folder.glob("*.safetensors")):
        hasher.update(file.read_bytes())
    return hasher.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.5b", help="the Qwen2.5 shape of the pair")
    parser.add_argument("--workdir", type=Path, default=None, help="default: runs/merge-bench[-SHAPE]")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--mergekit-path", type=Path, default=None,
                        help="a pip --target folder holding mergekit (default: mergekit-yaml next to this python)")
    args = parser.parse_args()
    mergekit_bin = (args.mergekit_path / "bin" if args.mergekit_path else BIN) / "mergekit-yaml"
    envs = {"mergekit-yaml dare_linear": {"PYTHONPATH": str(args.mergekit_path)}} if args.mergekit_path else {}
    no_ray: dict[str, str] = {}  # the environment is expected not to name a cluster (RAY_ADDRESS unset)
    workdir = args.workdir or ROOT / "runs" / ("merge-bench" if args.shape == "0.5b" else f"merge-bench-{args.shape}")
    base, finetuned = build_pair(workdir, args.shape)
    model_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    moved = 3 * model_bytes  # two models read, one written
    out = workdir / "out"
    config = workdir / "mergekit.yml"
    config.write_text(MERGEKIT_CONFIG.format(base=base, finetuned=finetuned, weight=1 - ALPHA, density=1 - DROP_RATE))
    merge_args = ["merge", "--base", str(base), "--finetuned", str(finetuned), "--out", str(out), "--alpha",
                  str(ALPHA), "--drop-rate", str(DROP_RATE), "--seed", str(SEED)]
    commands = {
        "imm-ray merge --workers 1": [str(BIN / "imm-ray"), *merge_args, "--workers", "1"],
        "imm-ray merge --workers 2": [str(BIN / "imm-ray"), *merge_args, "--workers", "2"],
        "imm-ray merge --backend ray --workers 2": [str(BIN / "imm-ray"), *merge_args, "--backend", "ray",
                                                     "--workers", "2"],
        "mergekit-yaml dare_linear": [str(mergekit_bin), str(config), str(out), "--random-seed", str(SEED),
                                      "--quiet"],
        "I/O floor (safetensors read 2, write 1)": [sys.executable, "-c", IO_FLOOR, str(base), str(finetuned),
                                                     str(out)],
        "merge_models, Ray already up, 2 workers": [sys.executable, "-c", _ray_up(), str(base), str(finetuned),
                                                    str(out), "2"],
    }
    load_before = load_average()
    results: dict[str, list[Run]] = {name: [] for name in commands}
    digests: dict[str, str] = {}
    for repeat in range(args.repeats):
        for name, command in commands.items():  # interleaved, so that load changes hit every tool alike
            shutil.rmtree(out, ignore_errors=True)
            run = measure(command, {**no_ray, **envs.get(name, {})})
            results[name].append(run)
            if name.startswith("imm-ray"):
                digests[name] = digest(out)
            print(f"[{repeat + 1}/{args.repeats}] {name}: {run.wall:.2f} s, largest process {run.largest_rss_mib:.0f} "
                  f"MiB ({run.largest_process}), tree {run.tree_rss_mib:.0f} MiB"
                  + (f", merge call {run.merge_seconds:.2f} s" if run.merge_seconds else ""), flush=True)
    shutil.rmtree(out, ignore_errors=True)
    identical = len(set(digests.values())) == 1
    report = render(results, moved, model_bytes, identical, load_before, load_average(), args.shape)
    print(report)
    if not args.no_write:
        write_section(report, args.shape)


def _ray_up() -> str:
    return RAY_UP.format(alpha=ALPHA, p=DROP_RATE, seed=SEED)


def render(results: dict[str, list[Run]], moved: int, model_bytes: int, identical: bool, before: str,
           after: str, shape: str = "0.5b") -> str:
    def median(name: str, field: str) -> float:
        return statistics.median(getattr(run, field) for run in results[name])

    lines = [
        "| run | wall s (median) | wall s (min–max) | largest process peak RSS MiB | process tree RSS MiB | GB/s |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        walls = [run.wall for run in runs]
        largest = max(runs, key=lambda run: run.largest_rss_mib)
        lines.append(f"| {name} | {median(name, 'wall'):.2f} | {min(walls):.2f}–{max(walls):.2f} | "
                     f"{largest.largest_rss_mib:.0f} ({largest.largest_process}) | "
                     f"{median(name, 'tree_rss_mib'):.0f} | "
                     f"{moved / 1e9 / median(name, 'wall'):.2f} |")
    for name in [n for n in results if n.startswith("merge_models")]:
        calls = [run.merge_seconds for run in results[name] if run.merge_seconds]
        lines.append(f"| {name}: the merge call alone | {statistics.median(calls):.2f} | {min(calls):.2f}–"
                     f"{max(calls):.2f} | | | {moved / 1e9 / statistics.median(calls):.2f} |")
    mergekit_wall = median("mergekit-yaml dare_linear", "wall")
    mergekit_rss = max(run.largest_rss_mib for run in results["mergekit-yaml dare_linear"])
    ours_wall = median("imm-ray merge --workers 2", "wall")
    ours_rss = max(run.largest_rss_mib for name in results if name.startswith(("imm-ray", "merge_models"))
                   for run in results[name])
    floor = median("I/O floor (safetensors read 2, write 1)", "wall")
    call = statistics.median(run.merge_seconds for run in results["merge_models, Ray already up, 2 workers"]
                             if run.merge_seconds)
    goals = [
        _goal(f"whole-process wall ≤ {WALL_GOAL[shape]}× mergekit", ours_wall, WALL_GOAL[shape] * mergekit_wall,
              "s"),
        _goal("largest process peak RSS ≤ ¼ mergekit", ours_rss, mergekit_rss / 4, "MiB"),
        _goal("merge call with Ray up ≤ 2× I/O floor", call, 2 * floor, "s"),
        f"- Whole process: {ours_wall:.2f} s with local processes = {ours_wall / mergekit_wall:.2f}× mergekit; "
        f"with a Ray started for it {median('imm-ray merge --backend ray --workers 2', 'wall'):.2f} s; "
        f"with Ray already up, {call:.2f} s in the merge call (actor start included).",
    ]
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    busy = max(float(before.split()[0]), float(after.split()[0])) > (os.cpu_count() or 1)
    caveat = (" Other processes kept the load above the core count: every time is inflated and the time ratios are "
              "unreliable (multi-threaded runs suffer most); peak RSS is not affected." if busy else "")
    return "\n".join([
        f"Measured {date} on {machine()}; load average (1, 5, 15 min) {before} before, {after} after.{caveat}",
        f"Inputs: random Qwen2.5-{shape.upper()}-shaped bf16 pair ({model_bytes / 1e9:.2f} GB each, two shards); "
        f"DARE p = {DROP_RATE}, α = {ALPHA}; GB/s = (two models read + one written) / time. "
        f"imm-ray outputs for 1 and 2 local workers and 2 Ray workers bit-identical: {'yes' if identical else 'NO'}.",
        "",
        *lines,
        "",
        *goals,
    ])


def _goal(name: str, value: float, limit: float, unit: str) -> str:
    verdict = "met" if value <= limit else f"MISSED by {value - limit:.2f} {unit} ({value / limit:.2f}× the limit)"
    return f"- {name}: {value:.2f} {unit} against a limit of {limit:.2f} {unit}: {verdict}."


def write_section(report: str, shape: str = "0.5b") -> None:
    """Replace only this benchmark's part of docs/benchmarks.md (other sections belong to other benchmarks); a shape
    measured for the first time goes after the 0.5B figures."""
    start, end = markers(shape)
    body = f"{start}\n{report}\n{end}"
    first_end = markers("0.5b")[1]
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if start in text and end in text:
        text = text[: text.index(start)] + body + text[text.index(end) + len(end):]
    elif shape != "0.5b" and first_end in text:
        text = text.replace(first_end, f"{first_end}\n\n{body}", 1)
    elif "## Merge engine" in text:
        text = text.replace("## Merge engine\n", f"## Merge engine\n\n{body}\n", 1)
    else:
        text = text.rstrip() + "\n\n## Merge engine\n\n" + textwrap.dedent(HOW) + "\n" + body + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
    print(f"wrote {DOC}")


HOW = """\
`python benchmarks/merge_bench.py` (or `make bench`): imm-ray merge against mergekit 0.1.5 `dare_linear` and the
safetensors I/O floor on the same locally built 0.5B-shaped bf16 pair, each run a fresh process, interleaved.
"""


if __name__ == "__main__":
    main()
