"""The decision probe: exact on a constructed model, and what it reads on the shipped base."""

from __future__ import annotations

import re

import pytest
import torch

from imm_ray.data.records import Problem
from imm_ray.data.toy import STEP_LINE, load_toy
from imm_ray.toy import TOY_MODEL_DIR
from imm_ray.toy.check import load_model
from imm_ray.toy.probe import field_probabilities


class _Uniform(torch.nn.Module):
    """A model whose every next-token distribution is uniform over the vocabulary."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids):
        return type("Out", (), {"logits": torch.zeros((*input_ids.shape, self.vocab))})()


def test_a_uniform_model_gets_one_over_the_vocabulary_at_every_field() -> None:
    _, tokenizer = load_model(TOY_MODEL_DIR)
    problems = load_toy("toy_id", "test", 3, 0)
    results = field_probabilities(_Uniform(len(tokenizer)), tokenizer, problems)
    assert [r.field for r in results] == list(STEP_LINE.groupindex)
    assert all(r.count == 6 and r.questions == 3 for r in results)  # two step lines per ID problem
    assert all(r.mean == pytest.approx(1 / len(tokenizer)) for r in results)
    assert all(r.low == pytest.approx(r.mean) == pytest.approx(r.high) for r in results)  # nothing varies


def test_each_field_is_read_at_its_own_token() -> None:
    """A pattern matching one known character: the probe must read the token holding it."""
    model, tokenizer = load_model(TOY_MODEL_DIR)
    problem = load_toy("toy_id", "test", 1, 0)[0]
    results = field_probabilities(model, tokenizer, [problem], re.compile(r"(?P<equals>=)"))
    assert results[0].count == problem.solution.count("=")
    assert results[0].mean > 0.99  # "=" follows the amount in every line of every document


def test_the_shipped_base_places_numbers_and_flips_a_coin_for_the_sign() -> None:
    """docs/toy_world.md, round 2: amounts copied, signs at chance."""
    model, tokenizer = load_model(TOY_MODEL_DIR)
    problems = load_toy("toy_ood_compare", "test", 30, 0)
    results = {r.field: r.mean for r in field_probabilities(model, tokenizer, problems)}
    assert results["amount"] > 0.95 and results["total"] > 0.95
    assert 0.35 < results["sign"] < 0.65
    sign = next(r for r in field_probabilities(model, tokenizer, problems) if r.field == "sign")
    assert sign.low <= sign.mean <= sign.high and sign.questions == 30


def test_a_problem_without_a_solution_is_refused() -> None:
    model, tokenizer = load_model(TOY_MODEL_DIR)
    with pytest.raises(ValueError, match="no reference solution"):
        field_probabilities(model, tokenizer, [Problem(id="x/1", set_name="x", question="q", answer="1",
                                                       kind="numeric")])


def test_the_probe_command_prints_every_family_and_refuses_a_folder_without_a_model(tmp_path) -> None:
    from typer.testing import CliRunner

    from imm_ray.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["toy", "probe", "--n", "4"])
    assert result.exit_code == 0, result.output
    assert all(name in result.output for name in ("toy_id", "toy_ood_compare", "toy_ood_distractor", "sign"))
    refused = runner.invoke(app, ["toy", "probe", "--model", str(tmp_path)])
    assert refused.exit_code == 2 and "no config.json" in refused.output
