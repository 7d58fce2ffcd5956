import pandas as pd

from imm_ray.config import load_config
from imm_ray.data.prompts import build_prompt
from imm_ray.loop import IterationLoop
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
