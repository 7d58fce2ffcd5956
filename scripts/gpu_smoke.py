"""GPU smoke test: the SFT and merge code paths the loop runs, on one CUDA GPU, with no download.

Builds a small random Qwen2 (bf16, 4 layers, hidden 256) and a tokenizer locally (Hugging Face ``tokenizers``),
fine-tunes it on synthetic arithmetic pairs through ``actors.training.run_sft`` (Ray Train TorchTrainer, DeepSpeed
ZeRO-3, bf16, NCCL, one worker, checkpoints on), merges the result with the base through
``actors.merging.merge_models`` (IMM: DARE + α; the merge engine has no device option, so it runs on the CPU),
then loads base, SFT and merged models on the GPU with transformers and compares their loss on held-out pairs.
Prints a summary and writes it as JSON; exits non-zero on any failed check. ``--cpu`` runs the same path on the
CPU (gloo) to check the script where there is no GPU. Under ``ray job submit`` (RAY_ADDRESS set) it uses the
cluster; ``--out`` must then be on storage every node shares.

``--bare`` (chosen by scripts/gpu_smoke.sh when Ray or DeepSpeed is not installed) runs the same stages with
torch, transformers and safetensors only: scripts/gpu_smoke_bare.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from smoke_common import SmokeFailure, arithmetic_pairs, build_model, check, held_out_loss

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # actors/ and imm_ray/ without an install

WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
              "PYTHONPATH": str(ROOT)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (gloo, fp32) instead of one CUDA GPU")
    parser.add_argument("--out", type=Path, help="work folder (default: a temporary one, removed at the end)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=1024, help="synthetic training pairs")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--bare", action="store_true",
                        help="torch, transformers and safetensors only: no Ray, vLLM or DeepSpeed (gpu_smoke_bare.py)")
    return parser.parse_args()


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import deepspeed
    import pandas as pd
    import ray
    import torch
    from safetensors import safe_open

    from actors.merging import merge_models
    from actors.training import SFTJob, run_sft
    from imm_ray.merge.options import MergeOptions

    gpu = not args.cpu
    check(not gpu or torch.cuda.is_available(), "no CUDA GPU visible to torch (use --cpu to check the script)")
    device = "cuda" if gpu else "cpu"
    summary: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if gpu else "CPU", "torch": torch.__version__,
        "cuda": torch.version.cuda, "ray": ray.__version__, "deepspeed": deepspeed.__version__,
    }

    pairs = arithmetic_pairs(args.pairs + 64, seed=0)
    train, held_out = pairs[: args.pairs], pairs[args.pairs:]
    base = work / "base"
    summary["parameters"] = build_model(base, args.layers, args.hidden, [p + r for p, r in train])
    data = work / "pairs.parquet"
    pd.DataFrame(train, columns=["prompt", "response"]).to_parquet(data)

    started = time.perf_counter()
    if os.environ.get("RAY_ADDRESS"):  # a Ray job on a cluster: its own cluster, its own runtime env
        ray.init(logging_level="WARNING")
    else:
        ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": WORKER_ENV}, logging_level="WARNING")
    summary["ray_init_s"] = round(time.perf_counter() - started, 1)

    job = SFTJob(
        model_path=str(base), data_path=str(data), output_dir=str(work / "sft"), storage_path=str(work / "ray"),
        name="gpu-smoke", epochs=args.epochs, learning_rate=1e-3, per_device_batch_size=16,
        gradient_accumulation_steps=2, warmup_ratio=0.03, lr_scheduler="cosine", max_length=128,
        precision="bf16" if gpu else "fp32", zero_stage=3, num_workers=1, cpus_per_worker=2, use_gpu=gpu,
        checkpoint_every_steps=10,
    )
    started = time.perf_counter()
    log = run_sft(job)
    summary["sft"] = {
        "zero_stage": job.zero_stage, "precision": job.precision, "workers": log["world_size"],
        "loss_per_epoch": [round(e["loss"], 4) for e in log["epochs"]], "optimizer_steps": log["optimizer_steps"],
        "wall_s": round(time.perf_counter() - started, 1), "train_s": log["last_attempt_seconds"],
        "peak_gpu_memory_mib": round(log["peak_gpu_memory_bytes"] / 2**20) if gpu else None,
    }
    losses = summary["sft"]["loss_per_epoch"]
    check(len(losses) == args.epochs and losses[-1] < losses[0], f"SFT loss did not fall: {losses}")
    with safe_open(str(work / "sft" / "model.safetensors"), framework="pt") as handle:
        dtypes = {handle.get_slice(key).get_dtype() for key in handle.keys()}
    check(dtypes == {"BF16"}, f"consolidated SFT model is not 16-bit: {dtypes}")

    started = time.perf_counter()
    record = merge_models(MergeOptions(base=base, finetuned=(work / "sft",), out=work / "merged", alpha=0.5,
                                       drop_rate=0.2, seed=0))
    summary["merge"] = {"device": "CPU (the merge engine has no device option)", "alpha": record.alpha,
                        "drop_rate": record.drop_rate, "workers": record.workers, "tensors": record.tensors,
                        "wall_s": round(time.perf_counter() - started, 1)}
    ray.shutdown()

    started = time.perf_counter()
    summary["held_out_loss"] = {name: round(held_out_loss(work / name, held_out, device), 4)
                                for name in ("base", "sft", "merged")}
    summary["eval_s"] = round(time.perf_counter() - started, 1)
    if gpu:
        summary["driver_peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    held = summary["held_out_loss"]
    check(held["sft"] < held["base"], f"SFT model is no better than the base on held-out pairs: {held}")
    check(held["merged"] < held["base"], f"merged model is no better than the base on held-out pairs: {held}")
    return summary


def print_summary(summary: dict[str, Any], seconds: float) -> None:
    sft, merge = summary["sft"], summary["merge"]
    lines = [
        "=" * 72,
        "imm-ray GPU smoke test: PASSED",
        f"device            {summary['device']}  (torch {summary['torch']}, CUDA {summary['cuda']}, "
        f"DeepSpeed {summary['deepspeed']}, Ray {summary['ray']})",
        f"model             random Qwen2, {summary['parameters'] / 1e6:.1f}M parameters, bf16",
        f"SFT               ZeRO-{sft['zero_stage']} {sft['precision']}, {sft['workers']} worker, "
        f"{sft['optimizer_steps']} optimizer steps, {sft['wall_s']} s (training {sft['train_s']} s)",
        f"SFT loss/epoch    {', '.join(str(x) for x in sft['loss_per_epoch'])}",
        f"SFT peak GPU mem  {sft['peak_gpu_memory_mib'] or 'n/a'} MiB (rank 0)",
        f"merge             IMM α={merge['alpha']} p={merge['drop_rate']}, {merge['tensors']} tensors, "
        f"{merge['workers']} Ray workers on {merge['device']}: {merge['wall_s']} s",
        f"held-out loss     base {summary['held_out_loss']['base']}, SFT {summary['held_out_loss']['sft']}, "
        f"merged {summary['held_out_loss']['merged']} ({summary['eval_s']} s)",
        f"total             {seconds:.1f} s",
        "=" * 72,
    ]
    print("\n".join(lines), flush=True)


def main() -> int:
    args = parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="imm-gpu-smoke-") as tmp:
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        try:
            if args.bare:
                from gpu_smoke_bare import run_bare

                summary = run_bare(args, work)
            else:
                summary = run(args, work)
        except SmokeFailure as failure:
            print(f"imm-ray GPU smoke test: FAILED: {failure}", file=sys.stderr, flush=True)
            return 1
        summary["total_s"] = round(time.perf_counter() - started, 1)
        (work / "summary.json").write_text(json.dumps(summary, indent=2))
        if args.bare:
            from gpu_smoke_bare import print_bare_summary

            print_bare_summary(summary)
        else:
            print_summary(summary, summary["total_s"])
        print(f"summary.json: {work / 'summary.json'}" if args.out else "", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
