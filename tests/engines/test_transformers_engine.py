"""The transformers engine against the engine contract, on a tiny Qwen2 that has memorised four lines."""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_test_model import OFF_CORPUS, PROMPTS, build_engine_test_model, memorised_rest

from actors.engines import EngineSpec, SamplingRequest, make_engine
from actors.engines.transformers_engine import TransformersEngine

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_engine_test_model(tmp_path_factory.mktemp("engine_model"))


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> TransformersEngine:
    built = make_engine(EngineSpec(kind="transformers", model_path=str(model_dir)))
    assert isinstance(built, TransformersEngine)
    return built


def sample(engine: TransformersEngine, seed: int, n: int = 3) -> list[list[str]]:
    return engine.generate(OFF_CORPUS, SamplingRequest(n=n, temperature=1.0, max_new_tokens=12, seed=seed))


def test_greedy_completes_the_memorised_lines_in_a_left_padded_batch(engine: TransformersEngine) -> None:
    """Prompts of different lengths share one left-padded batch; greedy must still follow each line to eos."""
    request = SamplingRequest(n=1, temperature=0, max_new_tokens=40, seed=0)
    assert len({len(p) for p in PROMPTS}) > 1
    got = engine.generate(PROMPTS, request)
    assert got == [[memorised_rest(i)] for i in range(len(PROMPTS))]


def test_n_samples_per_prompt_in_prompt_order(engine: TransformersEngine) -> None:
    got = sample(engine, seed=1, n=4)
    assert [len(samples) for samples in got] == [4] * len(OFF_CORPUS)
    assert all(len(set(samples)) > 1 for samples in got), got


def test_each_call_runs_on_the_specs_threads(engine: TransformersEngine) -> None:
    """A kept task worker process runs other stages' tasks between two of the engine's (the layer analysis sets
    its own thread count): the engine's calls go back to the spec's."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(engine.spec.threads + 1)
    try:
        sample(engine, seed=3, n=1)
        assert torch.get_num_threads() == engine.spec.threads
    finally:
        torch.set_num_threads(before)


def test_same_seed_same_samples_other_seed_other_samples(engine: TransformersEngine) -> None:
    first = sample(engine, seed=7)
    assert sample(engine, seed=7) == first
    assert sample(engine, seed=8) != first


def test_stop_string_ends_the_greedy_completion(engine: TransformersEngine) -> None:
    request = SamplingRequest(n=1, temperature=0, max_new_tokens=40, seed=0, stop=(". The answer",))
    got = engine.generate(PROMPTS, request)
    assert got == [[memorised_rest(i).split(". The answer")[0]] for i in range(len(PROMPTS))]


def test_stop_strings_never_appear_in_samples(engine: TransformersEngine) -> None:
    """The stop strings are characters the off-corpus samples produce often (checked unstopped first)."""
    stop = (".", "4")
    unstopped = [text for samples in sample(engine, seed=3, n=4) for text in samples]
    assert any(marker in text for text in unstopped for marker in stop)
    request = SamplingRequest(n=4, temperature=1.0, max_new_tokens=12, seed=3, stop=stop)
    stopped = [text for samples in engine.generate(OFF_CORPUS, request) for text in samples]
    assert not any(marker in text for text in stopped for marker in stop)


def test_greedy_with_n_returns_n_copies(engine: TransformersEngine) -> None:
    got = engine.generate(PROMPTS[:2], SamplingRequest(n=3, temperature=0, max_new_tokens=40, seed=0))
    assert got == [[memorised_rest(i)] * 3 for i in range(2)]


def test_spec_resolves_auto_to_concrete_settings() -> None:
    """The spec holds what the engine will run (so a fingerprint of it tells engines apart), never "auto"."""
    spec = EngineSpec(kind="transformers", model_path="m")
    assert spec.dtype in ("float32", "bfloat16", "float16") and spec.attention in ("sdpa", "eager")
    assert EngineSpec(kind="transformers", model_path="m", dtype="auto") == spec
    assert EngineSpec.model_validate(spec.model_dump(mode="json")) == spec
    pinned = EngineSpec(kind="transformers", model_path="m", dtype="float32", attention="sdpa")
    assert (pinned.dtype, pinned.attention) == ("float32", "sdpa")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_each_dtype_same_seed_same_samples(model_dir: Path, dtype: str) -> None:
    built = make_engine(EngineSpec(kind="transformers", model_path=str(model_dir), dtype=dtype))
    first = sample(built, seed=5, n=4)
    assert sample(built, seed=5, n=4) == first
    request = SamplingRequest(n=1, temperature=0, max_new_tokens=40, seed=0)
    assert built.generate(PROMPTS, request) == [[memorised_rest(i)] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("kv_cache", ["preallocated", "static"])
def test_kv_caches_give_the_dynamic_caches_samples_in_float32(model_dir: Path, kv_cache: str) -> None:
    """The preallocated cache only changes where keys and values live, not the arithmetic."""
    def engine_with(cache: str) -> TransformersEngine:
        return make_engine(EngineSpec(kind="transformers", model_path=str(model_dir), dtype="float32",
                                      attention="eager", kv_cache=cache))

    assert sample(engine_with(kv_cache), seed=9, n=4) == sample(engine_with("dynamic"), seed=9, n=4)


@pytest.mark.parametrize("kv_cache", ["preallocated", "dynamic"])
def test_a_prompt_encoded_once_gives_the_samples_of_encoding_it_per_sample(model_dir: Path, kv_cache: str) -> None:
    """The shared prefill changes how often a prompt is encoded, not the draws: the same samples as
    ``num_return_sequences`` repeating the prompt, for every sample of a left-padded batch (float32)."""
    def engine_with(prefill: str) -> TransformersEngine:
        return make_engine(EngineSpec(kind="transformers", model_path=str(model_dir), dtype="float32",
                                      kv_cache=kv_cache, prefill=prefill))

    shared, per_sample = engine_with("shared"), engine_with("per_sample")
    assert len({len(p) for p in OFF_CORPUS + PROMPTS}) > 1
    for seed in (2, 9):
        request = SamplingRequest(n=4, temperature=1.0, max_new_tokens=12, seed=seed)
        assert shared.generate(OFF_CORPUS + PROMPTS, request) == per_sample.generate(OFF_CORPUS + PROMPTS, request)


def test_groups_are_generated_one_call_each_with_their_own_seeds(engine: TransformersEngine) -> None:
    groups = [(OFF_CORPUS, SamplingRequest(n=2, temperature=1.0, max_new_tokens=8, seed=3)),
              (PROMPTS[:2], SamplingRequest(n=1, temperature=0.4, max_new_tokens=8, seed=4))]
    assert engine.generate_groups(groups) == [engine.generate(prompts, request) for prompts, request in groups]
