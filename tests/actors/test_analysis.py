"""The layer analysis as a Ray task equals the in-process functions on the same models and pairs."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from actors.analysis import analyze_model, model_importance
from imm_ray.analysis import AnalysisError, layer_importance, weight_change
from imm_ray.analysis_resources import AnalysisResources
from tiny_model import build_tiny_model

PAIRS = [("Question: Tom has 3 apples and buys 4 more. How many?\nAnswer: ", "3 + 4 = 7. The answer is 7"),
         ("Question: A box holds 12 pens; 5 are taken. How many are left?\nAnswer: ", "12 - 5 = 7. The answer is 7"),
         ("Instruction: What is 2 + 2?\nResponse: ", "Let's think step by step. 2 + 2 = 4. The answer is 4")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    return str(build_tiny_model(root / "base", seed=0)), str(build_tiny_model(root / "tuned", seed=1))


def test_task_equals_in_process(ray_cluster, models):
    base, tuned = models
    resources = AnalysisResources(cpus=1)
    change, importance = analyze_model(base, tuned, PAIRS, resources)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the task's one CPU: the same float sums
    try:
        pd.testing.assert_frame_equal(change, weight_change(base, tuned), check_exact=True)
        pd.testing.assert_frame_equal(importance, layer_importance(tuned, PAIRS, progress=False), check_exact=True)
    finally:
        torch.set_num_threads(threads)
    pd.testing.assert_frame_equal(model_importance(tuned, PAIRS, resources), importance, check_exact=True)


def test_analysis_error_in_the_task_reaches_the_driver_as_itself(ray_cluster, models, tmp_path):
    with pytest.raises(AnalysisError, match="no safetensors|holds no"):
        model_importance(str(tmp_path), PAIRS, AnalysisResources())


def test_the_analysis_gives_back_the_worker_process_threads(models):
    """A task worker process is kept and runs the next stage's generation tasks: an analysis on 2 CPUs must not
    leave it at 2 torch threads (generation on one CPU would then compete for both cores)."""
    from actors.analysis import _analyze

    base, tuned = models
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _analyze(base, tuned, PAIRS, AnalysisResources(cpus=2))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
