"""The transformers engine's two prefills side by side: each prompt encoded once for its n samples ("shared",
the default) against encoded n times (``num_return_sequences``, "per_sample"), on the same prompts and seeds.

Two workloads, each in one process on one torch thread (the pipeline's setting), the engine's default dtype,
attention and cache, built and warmed up before the clock:

- toy: one evaluation request group of the default run (128 ``toy_id`` test questions, zero-shot prompts, n = 2 at
  T = 0.6, ≤ 96 new tokens, the stop strings), on the shipped toy model;
- 0.5b: a random Qwen2.5-0.5B-shaped model (``benchmarks/generation_bench.py`` builds it), 16 prompts of 32 words,
  n = 2 at T = 0.6, 32 new tokens (a random model never stops early).

The two settings alternate ``--rounds`` times; each line has both times, their ratio and how many samples are the
same string under both (the draws are the same; bf16 arithmetic can differ in the last bit between a batch of
prompts and the batch repeated, which may change a token). Load average before and after is printed.

Usage: python benchmarks/prefill_bench.py [--model toy|0.5b|both] [--rounds N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def workload(model: str, folder: Path):
    """(model path, prompts, request) of one workload."""
    from actors.engines import SamplingRequest
    from imm_ray.data.prompts import STOP_STRINGS, build_prompt
    from imm_ray.data.toy import load_toy

    if model == "toy":
        prompts = [build_prompt(p.question) for p in load_toy("toy_id", "test", n=128)]
        request = SamplingRequest(n=2, temperature=0.6, max_new_tokens=96, seed=1, stop=STOP_STRINGS)
        return ROOT / "imm_ray" / "assets" / "toy", prompts, request
    from generation_bench import QWEN25_05B_SHAPE, random_qwen2, word_prompts

    path = random_qwen2(folder / "qwen05b", QWEN25_05B_SHAPE)
    return path, word_prompts(QWEN25_05B_SHAPE.vocab)[:16], SamplingRequest(n=2, temperature=0.6, max_new_tokens=32,
                                                                             seed=1)


def compare(model: str, rounds: int) -> None:
    import torch

    from actors.engines import EngineSpec, SamplingRequest, make_engine

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path, prompts, request = workload(model, Path(tmp))
        engines = {prefill: make_engine(EngineSpec(kind="transformers", model_path=str(path), prefill=prefill))
                   for prefill in ("per_sample", "shared")}
        warm = SamplingRequest(n=2, temperature=0.6, max_new_tokens=4, seed=0)
        for engine in engines.values():
            engine.generate(prompts[:4], warm)
        spec = engines["shared"].spec
        print(f"{model}: {len(prompts)} prompts x n={request.n}, <= {request.max_new_tokens} new tokens, "
              f"{spec.dtype}, {spec.attention}, {spec.kv_cache} cache, 1 thread; load {load()}")
        for index in range(rounds):
            seconds, samples = {}, {}
            for prefill, engine in engines.items():
                started = time.perf_counter()
                samples[prefill] = [text for group in engine.generate(prompts, request) for text in group]
                seconds[prefill] = time.perf_counter() - started
            same = sum(a == b for a, b in zip(samples["per_sample"], samples["shared"]))
            print(f"  round {index + 1}: per_sample {seconds['per_sample']:.3f} s, shared {seconds['shared']:.3f} s, "
                  f"shared / per_sample {seconds['shared'] / seconds['per_sample']:.2f}; "
                  f"same samples {same} of {len(samples['shared'])}")
        print(f"  load after {load()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["toy", "0.5b", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for model in (["toy", "0.5b"] if args.model == "both" else [args.model]):
        compare(model, args.rounds)


if __name__ == "__main__":
    main()
