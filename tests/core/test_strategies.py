import pandas as pd
import pytest

from imm_ray.strategies import STRATEGIES, select_sft_pairs


def pairs(iteration, ids):
    return pd.DataFrame({"question_id": ids, "prompt": ["p"] * len(ids),
                         "response": [f"r{i}" for i in ids], "iteration": iteration})


def test_registry_names_the_paper_strategies():
    assert set(STRATEGIES) == {"vanilla", "mixture", "accumulation", "imm", "iimm", "distillation"}
    assert STRATEGIES["vanilla"].merge_method is None
    assert STRATEGIES["imm"].merge_method == "imm" and STRATEGIES["iimm"].merge_method == "iimm"
    assert STRATEGIES["distillation"].teacher_generates


def test_current_policy_uses_only_this_iteration():
    out = select_sft_pairs("current", pairs(1, [1, 2]), [pairs(0, [3])], mixture_share=0.5, seed=0)
    assert sorted(out["question_id"]) == [1, 2]


def test_accumulation_is_the_union_without_duplicates():
    out = select_sft_pairs("accumulation", pairs(2, [1, 2]), [pairs(0, [1, 5]), pairs(1, [6])], mixture_share=0, seed=0)
    assert sorted(out["question_id"]) == [1, 2, 5, 6]


@pytest.mark.parametrize("share,expected", [(0.0, 2), (0.5, 4), (1.0, 6)])
def test_mixture_adds_a_share_of_the_previous_iteration(share, expected):
    previous = pairs(0, [10, 11, 12, 13])
    out = select_sft_pairs("mixture", pairs(1, [1, 2]), [pairs(0, [99]), previous], mixture_share=share, seed=3)
    assert len(out) == expected
    assert 99 not in set(out["question_id"])  # only the previous iteration, not older ones
    again = select_sft_pairs("mixture", pairs(1, [1, 2]), [pairs(0, [99]), previous], mixture_share=share, seed=3)
    assert out.equals(again)
