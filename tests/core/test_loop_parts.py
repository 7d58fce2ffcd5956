import io
import time

import pandas as pd
import pytest
import ray
from rich.console import Console

from imm_ray.config import load_config
from imm_ray.console import RunView
from imm_ray.data.prompts import build_prompt
from imm_ray.loop import IterationLoop, StageError
from imm_ray.stages import Step
from imm_ray.strategies import STRATEGIES, kept_pairs


def test_run_dir_is_absolute_even_for_a_relative_output_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loop = IterationLoop(load_config(None, ["experiment.output_dir=runs"]))
    assert loop.run_dir.is_absolute() and loop.run_dir == tmp_path / "runs" / "toy"


def test_kept_pairs_are_the_correct_samples_with_their_training_prompts_deduplicated():
    samples = pd.DataFrame({
        "question_id": ["a", "a", "a", "b"],
        "question": ["Q a", "Q a", "Q a", "Q b"],
        "prompt": ["few-shot ... Q a"] * 3 + ["few-shot ... Q b"],
        "completion": ["x\nThe answer is 1", " x\nThe answer is 1 ", "y\nThe answer is 2", "z\nThe answer is 3"],
        "correct": [True, True, False, True],
    })
    prompts = {"a": build_prompt("Q a"), "b": build_prompt("Q b")}
    pairs = kept_pairs(samples, 2, prompts)
    assert list(pairs["question_id"]) == ["a", "b"]
    assert list(pairs["prompt"]) == [build_prompt("Q a"), build_prompt("Q b")]
    assert list(pairs["response"]) == ["x\nThe answer is 1", "z\nThe answer is 3"]
    assert set(pairs["iteration"]) == {2}


# ---- a failed stage: one line with the stage, the cause and where the traceback is --------------------------------
@ray.remote
def _worker_that_fails(text: str) -> None:
    raise ValueError(f"bad value in the worker: {text}")


class _FailingStep(Step):
    """A stage whose work raises inside a Ray worker, as a generation actor or an SFT worker would."""

    kind = "boom"
    text: str

    def run(self, out, store):
        ray.get(_worker_that_fails.remote(self.text))


def test_a_worker_exception_becomes_one_line_with_the_stage_and_the_traceback_file(ray_cluster, tmp_path):
    loop = IterationLoop(load_config(None, [f"experiment.output_dir={tmp_path}", "experiment.name=fails"]))
    link = loop.run_dir / "seed_0" / "imm" / "iter_0" / "boom"
    with pytest.raises(StageError) as caught:
        loop._run(_FailingStep(text="x7"), link, "the failing stage")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("stage seed_0/imm/iter_0/boom (the failing stage) failed: "
                              "ValueError: bad value in the worker: x7 (full traceback: ")
    assert isinstance(caught.value.cause, ValueError)  # unwrapped from Ray's RayTaskError
    file = caught.value.traceback_file
    assert file.parent == loop.run_dir / "logs" and str(file) in message
    text = file.read_text()
    assert "_worker_that_fails" in text and "bad value in the worker: x7" in text  # the worker's own frames


def test_a_stage_error_keeps_its_cause_across_processes(tmp_path):
    import pickle

    from imm_ray.steps import NoCorrectSamplesError

    error = StageError("stage x failed: ...", NoCorrectSamplesError("iteration 0: none"), tmp_path / "tb.txt")
    again = pickle.loads(pickle.dumps(error))  # as a sweep trial's Ray task returns it
    assert str(again) == str(error) and isinstance(again.cause, NoCorrectSamplesError)
    assert again.traceback_file == error.traceback_file


# ---- concurrent chains: order, one computation of a shared stage, the first failure stops the run -----------------
class _SlowStep(Step):
    """A stage that takes ``seconds`` and writes its name, or raises."""

    kind = "slow"
    name: str
    seconds: float = 0.3
    fail: bool = False

    def run(self, out, store):
        time.sleep(self.seconds)
        if self.fail:
            raise ValueError(f"{self.name} went wrong")
        out.mkdir(parents=True)
        (out / "name.txt").write_text(self.name)
        return {}


def _concurrent_loop(tmp_path, lanes: int = 2) -> IterationLoop:
    config = load_config(None, [f"experiment.output_dir={tmp_path}", "experiment.name=chains",
                                f"resources.concurrent_chains={lanes}"])
    return IterationLoop(config, console=RunView(Console(file=io.StringIO(), force_terminal=False)))


def _chains(count: int) -> list:
    return [(STRATEGIES["imm"], seed) for seed in range(count)]


def test_concurrent_chains_run_at_once_and_come_back_in_the_order_of_the_config(tmp_path, monkeypatch):
    loop = _concurrent_loop(tmp_path)
    running, most = set(), []

    def chain(strategy, base, seed):
        running.add(seed)
        most.append(len(running))
        time.sleep(0.3 - 0.1 * seed)  # later chains finish first
        running.discard(seed)
        return [f"entries of seed {seed}"]

    monkeypatch.setattr(loop, "run_strategy", chain)
    assert loop._run_chains(_chains(3), None) == [["entries of seed 0"], ["entries of seed 1"], ["entries of seed 2"]]
    assert max(most) == 2  # two lanes: never a third chain at once


def test_a_stage_two_running_chains_declare_is_computed_once_and_reused_by_the_other(tmp_path, monkeypatch):
    loop = _concurrent_loop(tmp_path)
    shared = _SlowStep(name="iteration 0's generation", seconds=0.5)

    def chain(strategy, base, seed):
        loop._section(f"IMM · seed {seed} · iteration 0")
        return [loop._run(shared, loop.seed_dir(seed) / "generate", "generate")]

    monkeypatch.setattr(loop, "run_strategy", chain)
    [first], [second] = loop._run_chains(_chains(2), None)
    assert first == second and (first / "name.txt").read_text() == "iteration 0's generation"
    assert sorted(e.status for e in loop.events) == ["computed", "reused"]
    lines = loop.console.file.getvalue().splitlines()  # no section lines: each stage line names its chain
    assert not any(line.endswith("iteration 0") for line in lines)
    assert sum("IMM · seed 0 · iteration 0 · generate" in line for line in lines) >= 1
    assert sum("IMM · seed 1 · iteration 0 · generate" in line for line in lines) >= 1


def test_the_first_failed_stage_stops_the_other_chains_and_its_error_is_raised(tmp_path, monkeypatch):
    loop = _concurrent_loop(tmp_path)

    def chain(strategy, base, seed):
        where = loop.seed_dir(seed)
        first = loop._run(_SlowStep(name=f"seed {seed} stage 1", seconds=0.1 if seed else 0.6, fail=seed == 1),
                          where / "one", "stage one")
        return [first, loop._run(_SlowStep(name=f"seed {seed} stage 2"), where / "two", "stage two")]

    monkeypatch.setattr(loop, "run_strategy", chain)
    with pytest.raises(StageError, match="seed 1 stage 1 went wrong"):
        loop._run_chains(_chains(2), None)
    assert (loop.seed_dir(0) / "one" / "name.txt").is_file()  # the stage running when the other failed is kept
    assert not (loop.seed_dir(0) / "two").exists()  # and its chain started no other


def test_the_chains_that_start_first_share_no_iteration_0(tmp_path, monkeypatch):
    loop = _concurrent_loop(tmp_path)
    starts = []

    def chain(strategy, base, seed):
        starts.append((strategy.name, seed))
        time.sleep(0.2)
        return [(strategy.name, seed)]

    monkeypatch.setattr(loop, "run_strategy", chain)
    chains = [(STRATEGIES[name], seed) for seed in (0, 1) for name in ("imm", "vanilla")]  # the config's order
    assert loop._run_chains(chains, None) == [[("imm", 0)], [("vanilla", 0)], [("imm", 1)], [("vanilla", 1)]]
    assert sorted(starts[:2]) == [("imm", 0), ("imm", 1)]
