import pandas as pd
import pytest
import ray

from imm_ray.config import load_config
from imm_ray.data.prompts import build_prompt
from imm_ray.loop import IterationLoop, StageError
from imm_ray.stages import Step
from imm_ray.strategies import kept_pairs


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
