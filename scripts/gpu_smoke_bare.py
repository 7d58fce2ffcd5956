"""The GPU smoke test's bare path: torch, transformers, safetensors and the project's pure modules only.

A GPU box often has torch and transformers but not Ray, vLLM or DeepSpeed; this path runs the project's own code
for each stage without them, each timed with its peak GPU memory:

- generation: the transformers engine (actors/engines/transformers_engine.py) sampling on the device;
- SFT: the project's training step (actors/sft/worker.py ``train_step``: the job's global batch per optimizer
  step, token-weighted loss, actors/sft/batches.py order and collation) on one process, driven by a plain torch
  engine (:class:`PlainEngine`: AdamW, gradient clipping, cosine schedule) in place of DeepSpeed, under bf16
  autocast with float32 weights (DeepSpeed's bf16 mode keeps float32 master weights too, but ZeRO and its
  partitioning are not exercised here);
- the merge: the merge engine's local path (imm_ray.merge.plan + imm_ray.merge.engine) in this process, on the
  CPU (the engine has no device option);
- the layer analysis: weight change (streamed) and importance on the device (imm_ray.analysis).

It ends by checking that none of ray, vllm, deepspeed was imported.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from smoke_common import arithmetic_pairs, build_model, check, held_out_loss

CLUSTER_STACK = ("ray", "vllm", "deepspeed")


class PlainEngine:
    """The part of DeepSpeed's engine interface ``train_step`` uses, on one process with torch alone."""

    def __init__(self, model, optimizer, scheduler, device: str, max_grad_norm: float) -> None:
        self.module, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.device, self.max_grad_norm = device, max_grad_norm
        self._boundary = True

    def __call__(self, **batch):
        import torch

        with torch.autocast(device_type=self.device, dtype=torch.bfloat16):
            return self.module(**batch)

    def set_gradient_accumulation_boundary(self, boundary: bool) -> None:
        self._boundary = boundary

    def backward(self, loss, scale_wrt_gas: bool = False) -> None:  # noqa: ARG002 - DeepSpeed's signature
        loss.backward()

    def step(self) -> None:
        """Step the optimizer at an accumulation boundary only, as DeepSpeed's ``engine.step`` does."""
        import torch

        if not self._boundary:
            return
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


def timed(name: str, device: str, summary: dict[str, Any], work: Callable[[], dict[str, Any]]) -> None:
    """Run one stage; record its wall time, peak GPU memory (cuda) and the process's peak RSS so far."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = work()
    if device == "cuda":
        torch.cuda.synchronize()
    result["wall_s"] = round(time.perf_counter() - started, 2)
    result["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20) if device == "cuda" else None
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    summary[name] = result
    print(f"{name:10s} {result['wall_s']:7.2f} s  peak GPU {result['peak_gpu_memory_mib'] or 'n/a'} MiB", flush=True)


def generate(base: Path, device: str, prompts: list[str]) -> dict[str, Any]:
    from actors.engines.base import EngineSpec, SamplingRequest
    from actors.engines.transformers_engine import TransformersEngine

    dtype = "bfloat16" if device == "cuda" else "float32"
    engine = TransformersEngine(EngineSpec(kind="transformers", model_path=str(base), dtype=dtype,
                                           attention="sdpa", kv_cache="preallocated"))
    check(engine.device == device, f"the engine chose {engine.device}, the smoke test runs on {device}")
    request = SamplingRequest(n=4, temperature=0.6, max_new_tokens=32, seed=0)
    started = time.perf_counter()
    samples = engine.generate(prompts, request)
    seconds = time.perf_counter() - started
    completions = [text for group in samples for text in group]
    check(len(completions) == 4 * len(prompts), "the engine returned the wrong number of completions")
    tokens = sum(len(engine.tokenizer(text)["input_ids"]) for text in completions)
    return {"engine": "transformers", "dtype": dtype, "prompts": len(prompts), "samples": len(completions),
            "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}


def fine_tune(base: Path, out: Path, device: str, train: list[tuple[str, str]], epochs: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

    from actors.sft.batches import epoch_order, step_members, steps_per_epoch
    from actors.sft.worker import train_step
    from imm_ray.tokens import encode_pair

    batch, accumulate = 16, 2
    tokenizer = AutoTokenizer.from_pretrained(base)
    examples = [encode_pair(tokenizer, prompt, response, 128) for prompt, response in train]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    global_batch = batch * accumulate
    steps = steps_per_epoch(len(examples), global_batch)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=max(1, steps * epochs // 30),
                              num_training_steps=steps * epochs)
    engine = PlainEngine(model, optimizer, scheduler, device, max_grad_norm=1.0)
    losses = []
    for epoch in range(epochs):
        order = epoch_order(len(examples), seed=0, epoch=epoch)
        total, tokens = 0.0, 0
        for step in range(steps):
            loss_sum, step_tokens, _ = train_step(engine, examples, step_members(order, step, global_batch),
                                                  tokenizer.pad_token_id, 0, 1, batch)
            total, tokens = total + loss_sum, tokens + step_tokens
        losses.append(round(total / max(tokens, 1), 4))
    check(losses[-1] < losses[0], f"SFT loss did not fall: {losses}")
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {"precision": "bf16 autocast, float32 weights", "optimizer_steps": steps * epochs,
            "global_batch": global_batch, "loss_per_epoch": losses}


def merge_locally(base: Path, sft: Path, out: Path) -> dict[str, Any]:
    """IMM (DARE + α) through the merge engine's local path in this process: the steps of
    actors/merging.merge_models with backend local and one worker, without importing Ray."""
    import torch

    from imm_ray.merge import engine
    from imm_ray.merge import plan as planning
    from imm_ray.merge.options import MergeOptions
    from imm_ray.merge.tensors import INDEX_NAME, check_output, copy_aux_files, create_shards, staged_folder

    started = time.perf_counter()
    options = MergeOptions(base=base, finetuned=(sft,), out=out, alpha=0.5, drop_rate=0.2, seed=0)
    check_output(options.out, options.overwrite)
    inputs = planning.open_inputs(options)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a merge worker runs
    try:
        with staged_folder(options.out, options.overwrite) as folder:
            plan = planning.plan_merge(options, inputs, folder)
            batches = planning.work_batches(plan)
            create_shards(plan.shards, folder)
            for batch in batches:
                engine.run_batch(plan, batch)
            (folder / INDEX_NAME).write_text(json.dumps(plan.shards.index(), indent=2) + "\n")
            copy_aux_files(inputs.base.root, folder, None)
            record = planning.merge_record(options, inputs, plan, 1, planning.input_fingerprints(inputs),
                                           time.perf_counter() - started)
            record.write(folder)
    finally:
        torch.set_num_threads(threads)
    return {"device": "CPU (the merge engine has no device option)", "alpha": record.alpha,
            "drop_rate": record.drop_rate, "tensors": record.tensors, "batches": len(batches)}


def analyze(base: Path, sft: Path, device: str, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    from imm_ray.analysis import layer_importance, weight_change

    change = weight_change(base, sft)
    importance = layer_importance(sft, pairs, device=device, progress=False)
    check(bool((change["weight_change"] > 0).all()), "SFT changed no weight of some layer")
    check(bool((importance["importance"] > 0).all()), "a layer has zero importance")
    return {"layers": len(change), "pairs": len(pairs), "importance_device": device,
            "weight_change": [round(x, 4) for x in change["weight_change"]]}


def run_bare(args, work: Path) -> dict[str, Any]:
    import safetensors
    import torch
    import transformers

    device = "cpu" if args.cpu else "cuda"
    check(device == "cpu" or torch.cuda.is_available(), "no CUDA GPU visible to torch (use --cpu to check the script)")
    summary: dict[str, Any] = {
        "path": "bare (torch, transformers, safetensors; no Ray, vLLM, DeepSpeed)",
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "CPU", "torch": torch.__version__,
        "cuda": torch.version.cuda, "transformers": transformers.__version__, "safetensors": safetensors.__version__,
    }
    pairs = arithmetic_pairs(args.pairs + 64, seed=0)
    train, held_out = pairs[: args.pairs], pairs[args.pairs:]
    base, sft, merged = work / "base", work / "sft", work / "merged"
    summary["parameters"] = build_model(base, args.layers, args.hidden, [p + r for p, r in train])
    timed("generate", device, summary, lambda: generate(base, device, [p for p, _ in held_out]))
    timed("sft", device, summary, lambda: fine_tune(base, sft, device, train, args.epochs))
    timed("merge", "cpu", summary, lambda: merge_locally(base, sft, merged))
    timed("analysis", device, summary, lambda: analyze(base, sft, device, held_out))
    started = time.perf_counter()
    summary["held_out_loss"] = {name: round(held_out_loss(work / name, held_out, device), 4)
                                for name in ("base", "sft", "merged")}
    summary["eval_s"] = round(time.perf_counter() - started, 1)
    held = summary["held_out_loss"]
    check(held["sft"] < held["base"], f"SFT model is no better than the base on held-out pairs: {held}")
    check(held["merged"] < held["base"], f"merged model is no better than the base on held-out pairs: {held}")
    imported = [name for name in CLUSTER_STACK if sys.modules.get(name) is not None]  # None: an import blocked
    check(not imported, f"the bare path imported {imported}")
    summary["cluster_stack_imported"] = imported
    return summary


def print_bare_summary(summary: dict[str, Any]) -> None:
    lines = ["=" * 72, "imm-ray GPU smoke test (bare path): PASSED",
             f"device       {summary['device']}  (torch {summary['torch']}, CUDA {summary['cuda']}, "
             f"transformers {summary['transformers']})",
             f"model        random Qwen2, {summary['parameters'] / 1e6:.1f}M parameters, bf16"]
    for name in ("generate", "sft", "merge", "analysis"):
        stage = summary[name]
        lines.append(f"{name:12s} {stage['wall_s']} s, peak GPU {stage['peak_gpu_memory_mib'] or 'n/a'} MiB, "
                     f"peak RSS {stage['peak_rss_mib']} MiB")
    lines += [f"generate     {summary['generate']['tokens_per_s']} tokens/s",
              f"SFT loss     {', '.join(str(x) for x in summary['sft']['loss_per_epoch'])}",
              f"held-out     {summary['held_out_loss']}",
              f"Ray, vLLM, DeepSpeed imported: {summary['cluster_stack_imported'] or 'none'}",
              f"total        {summary['total_s']} s", "=" * 72]
    print("\n".join(lines), flush=True)
