import pytest

from actors.engines import EngineSpec
from actors.generation import PoolSpec, SamplingPlan, build_request_groups, generate_samples, groups_per_call
from imm_ray.data.records import Problem

PROBLEMS = [
    Problem(id=f"q{i}", set_name="toy_id", question=f"Tom has {i} apples and buys 2 more. How many?", answer=str(i + 2),
            kind="numeric")
    for i in range(5)
]
PROMPTS = [f"Instruction:\n{p.question}\n\nResponse: Let's think step by step.\n" for p in PROBLEMS]


def test_samples_are_dealt_round_robin_over_temperatures():
    plan = SamplingPlan(samples_per_question=4, temperatures=(0.2, 0.4, 0.6), max_new_tokens=4)
    assert plan.samples_at() == [(0.2, 2), (0.4, 1), (0.6, 1)]
    plan = SamplingPlan(samples_per_question=2, temperatures=(0.2, 0.4, 0.6), max_new_tokens=4)
    assert plan.samples_at() == [(0.2, 1), (0.4, 1)]


def test_request_groups_have_fixed_seeds():
    plan = SamplingPlan(samples_per_question=3, temperatures=(0.2, 0.6), max_new_tokens=4, questions_per_batch=2, seed=7)
    groups = build_request_groups(PROBLEMS, PROMPTS, plan)
    assert len(groups) == 2 * 3  # two temperatures × ceil(5 / 2) blocks
    assert groups == build_request_groups(PROBLEMS, PROMPTS, plan)
    other = build_request_groups(PROBLEMS, PROMPTS, SamplingPlan(**{**plan.__dict__, "seed": 8}))
    assert groups != other


def test_pipeline_samples_grades_and_is_independent_of_pool_size(ray_cluster, tiny_model):
    engine = EngineSpec(kind="transformers", model_path=str(tiny_model))
    plan = SamplingPlan(samples_per_question=3, temperatures=(0.2, 0.6), max_new_tokens=6, questions_per_batch=2, seed=1)
    one = generate_samples(PROBLEMS, PROMPTS, engine, plan, PoolSpec(min_actors=1, max_actors=1))
    two = generate_samples(PROBLEMS, PROMPTS, engine, plan, PoolSpec(min_actors=2, max_actors=2))
    assert len(one) == 15
    assert list(one.groupby("question_id")["sample_index"].apply(sorted)) == [[0, 1, 2]] * 5
    assert set(one["temperature"]) == {0.2, 0.6}
    assert one.equals(two)
    assert one["correct"].dtype == bool


def test_vllm_actors_take_their_whole_share_of_a_stage_per_call():
    transformers = EngineSpec(kind="transformers", model_path="m", dtype="float32", attention="sdpa")
    vllm = EngineSpec(kind="vllm", model_path="m", dtype="float32")
    assert groups_per_call(transformers, 30, 2) == 1
    assert groups_per_call(vllm, 30, 2) == 15 and groups_per_call(vllm, 31, 2) == 16
    assert groups_per_call(vllm, 3, 8) == 1


def test_cpu_engines_run_in_tasks_and_device_engines_in_stage_actors():
    from actors.generation import uses_actors

    assert not uses_actors(PoolSpec())
    assert uses_actors(PoolSpec(gpus_per_actor=1))


def test_vllm_cpu_tasks_run_the_engine_core_in_their_own_processes_and_transformers_tasks_as_the_job():
    from actors.generation import task_runtime_env

    vllm = EngineSpec(kind="vllm", model_path="m", dtype="float32")
    assert task_runtime_env(vllm) == {"runtime_env": {"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}}}
    # tensor parallel needs vLLM's multiprocess executor
    assert task_runtime_env(vllm.model_copy(update={"tensor_parallel_size": 2})) == {}
    assert task_runtime_env(EngineSpec(kind="transformers", model_path="m", dtype="float32")) == {}


class _Engine:
    """Records whether the kept-engine logic closed it, and which models it loaded in place (when ``loads``, the
    models whose path ends in ``loadable``, as a vllm-cpu engine takes a model of its own architecture)."""

    def __init__(self, spec: EngineSpec, loads: bool) -> None:
        self.spec, self.loads, self.closed, self.loaded = spec, loads, False, []

    def load_model(self, spec: EngineSpec) -> bool:
        if spec.model_path.endswith("corrupt"):
            raise OSError(f"cannot read {spec.model_path}")
        if not (self.loads and spec.model_path.endswith("loadable")):
            return False
        self.spec = spec
        self.loaded.append(spec.model_path)
        return True

    def close(self) -> None:
        self.closed = True


def _kept_engines(monkeypatch, loads: bool = False) -> list[_Engine]:
    import actors.generation as generation

    built: list[_Engine] = []
    monkeypatch.setattr(generation, "_kept", {})
    monkeypatch.setattr(generation, "make_engine", lambda spec: built.append(_Engine(spec, loads)) or built[-1])
    return built


def test_a_task_process_keeps_its_engine_for_the_same_spec(monkeypatch):
    from actors.generation import kept_engine

    built = _kept_engines(monkeypatch)
    spec = EngineSpec(kind="vllm", model_path="/m/merged", dtype="float32")
    assert kept_engine(spec) is kept_engine(spec.model_copy())
    assert len(built) == 1 and not built[0].closed


def test_another_model_or_setting_closes_the_kept_engine_and_builds_one(monkeypatch):
    from actors.generation import kept_engine

    built = _kept_engines(monkeypatch)
    spec = EngineSpec(kind="vllm", model_path="/m/merged", dtype="float32")
    first = kept_engine(spec)
    second = kept_engine(spec.model_copy(update={"model_path": "/m/sft"}))
    third = kept_engine(spec.model_copy(update={"model_path": "/m/sft", "dtype": "bfloat16"}))
    assert len({id(first), id(second), id(third)}) == 3
    assert [engine.closed for engine in built] == [True, True, False]


def test_a_kept_engine_that_can_take_the_new_model_loads_it_in_place(monkeypatch):
    from actors.generation import kept_engine

    built = _kept_engines(monkeypatch, loads=True)
    spec = EngineSpec(kind="vllm", model_path="/m/merged", dtype="float32")
    first = kept_engine(spec)
    sft = spec.model_copy(update={"model_path": "/m/sft-loadable"})
    assert kept_engine(sft) is first and kept_engine(sft) is first
    assert first.loaded == ["/m/sft-loadable"] and not first.closed
    # one it cannot take: closed, and a new engine built for it
    other = kept_engine(spec.model_copy(update={"model_path": "/m/teacher"}))
    assert other is not first and first.closed and len(built) == 2


def test_a_kept_engine_that_fails_to_load_a_model_is_closed_and_not_kept(monkeypatch):
    import actors.generation as generation
    from actors.generation import kept_engine

    built = _kept_engines(monkeypatch, loads=True)
    spec = EngineSpec(kind="vllm", model_path="/m/merged", dtype="float32")
    first = kept_engine(spec)
    with pytest.raises(OSError, match="corrupt"):
        kept_engine(spec.model_copy(update={"model_path": "/m/corrupt"}))
    assert first.closed and generation._kept == {}
    assert kept_engine(spec) is not first and len(built) == 2

