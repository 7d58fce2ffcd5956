"""The toy families: deterministic, disjoint splits, correct solutions, distinct surface forms."""

from __future__ import annotations

import itertools
import re

import pytest

from imm_ray.data.prompts import ANSWER_PREFIX, HEADER, RESPONSE_PREFIX, build_prompt
from imm_ray.data.toy import (
    DEFAULT_SIZES,
    ID_SET,
    TOY_SETS,
    ToyMixture,
    in_test_bucket,
    load_toy,
    pretraining_documents,
)

_EQUATION = re.compile(r"(\d+) ([+-]) (\d+) = (\d+)")


def test_sets_and_default_sizes() -> None:
    assert TOY_SETS[0] == ID_SET and len(TOY_SETS) >= 3 and len(set(TOY_SETS)) == len(TOY_SETS)
    assert len(load_toy(ID_SET, "test", None, 0)) == DEFAULT_SIZES["test"]


@pytest.mark.parametrize("name", TOY_SETS)
def test_deterministic_and_prefix_stable(name: str) -> None:
    first = load_toy(name, "train", 40, seed=3)
    assert first == load_toy(name, "train", 40, seed=3)
    assert load_toy(name, "train", 15, seed=3) == first[:15]
    assert [p.question for p in load_toy(name, "train", 40, seed=4)] != [p.question for p in first]
    assert [p.id for p in first[:2]] == [f"{name}/train/0", f"{name}/train/1"]
    assert all(p.kind == "numeric" and p.set_name == name for p in first)


@pytest.mark.parametrize("name", TOY_SETS)
def test_splits_disjoint_whatever_the_seed(name: str) -> None:
    train = {p.question for seed in (0, 1) for p in load_toy(name, "train", 400, seed)}
    test = {p.question for seed in (0, 1) for p in load_toy(name, "test", 200, seed)}
    assert not train & test
    assert all(in_test_bucket(name, q) for q in test) and not any(in_test_bucket(name, q) for q in train)
    assert len(test) > 300  # questions are distinct within a split, and seeds give different ones


def test_pretraining_never_shows_a_test_question() -> None:
    test = {build_prompt(p.question) for name in TOY_SETS for p in load_toy(name, "test", 200, 0)}
    documents = list(itertools.islice(pretraining_documents(0), 3000))
    assert all(doc.startswith(HEADER) and RESPONSE_PREFIX in doc for doc in documents)
    prompts = {doc[: doc.index(RESPONSE_PREFIX) + len(RESPONSE_PREFIX)] for doc in documents}
    assert not prompts & test


def test_mixture_shares_are_followed() -> None:
    mixture = ToyMixture(((TOY_SETS[0], 1.0), (TOY_SETS[1], 0.0), (TOY_SETS[2], 0.0)))
    documents = list(itertools.islice(pretraining_documents(5, mixture), 50))
    assert all(doc.rstrip().split("\n")[-2].startswith("Then ") for doc in documents)  # ID: two steps
    assert all("How many" in doc and "have now?" in doc for doc in documents)


@pytest.mark.parametrize("name", TOY_SETS)
def test_solutions_compute_the_answer(name: str) -> None:
    for problem in load_toy(name, "test", 100, 0):
        lines = (problem.solution or "").split("\n")
        assert lines[-1] == f"{ANSWER_PREFIX}{problem.answer}"
        running = None
        for line in lines[:-1]:
            a, op, b, result = _EQUATION.search(line).groups()  # type: ignore[union-attr]
            assert int(a) + (int(b) if op == "+" else -int(b)) == int(result)
            assert running is None or int(a) == running  # each step continues from the last result
            assert a in problem.question or running is not None
            assert b in problem.question
            running = int(result)
        assert running == int(problem.answer) > 0


def _skeleton(question: str) -> str:
    """A question with its numbers, names and objects blanked: what is left is the surface template."""
    text = re.sub(r"\d+", "#", question)
    return re.sub(r"\b[A-Z][a-z]+\b(?<!How)(?<!Then)(?<!Later)(?<!Next)(?<!After)(?<!At)(?<!The)", "N", text)


def test_families_differ_in_surface_form() -> None:
    skeletons = {name: {_skeleton(p.question) for p in load_toy(name, "train", 300, 0)} for name in TOY_SETS}
    for a, b in itertools.combinations(TOY_SETS, 2):
        assert not skeletons[a] & skeletons[b], (a, b)
    steps = {name: {(p.solution or "").count("\n") for p in load_toy(name, "train", 300, 0)} for name in TOY_SETS}
    assert steps[ID_SET] == {2}  # two steps plus the answer line
    assert steps["toy_ood_distractor"] == {2, 3}
    biggest = {name: max(int(p.answer) for p in load_toy(name, "train", 300, 0)) for name in TOY_SETS}
    assert biggest["toy_ood_distractor"] > 150 > biggest[ID_SET]  # other number ranges


def test_compare_family_inverts_the_keyword() -> None:
    for problem in load_toy("toy_ood_compare", "train", 50, 0):
        first_relation = problem.question.split(". ")[1]
        first_step = (problem.solution or "").split("\n")[0]
        assert (" more " in first_relation) == (" - " in first_step)


def test_distractor_adds_one_unused_number_before_the_last_change() -> None:
    for problem in load_toy("toy_ood_distractor", "train", 100, 0):
        steps = (problem.solution or "").split("\n")[:-1]
        numbers = re.findall(r"\d+", problem.question)
        assert len(numbers) == len(steps) + 2  # start, one per change, one irrelevant
        used = [int(_EQUATION.search(line).group(3)) for line in steps]  # type: ignore[union-attr]
        assert [int(n) for n in numbers if int(n) in used][-1] == used[-1]


def test_unknown_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="toy_id"):
        load_toy("toy_nope", "train", 5, 0)
    with pytest.raises(ValueError, match="train, test"):
        load_toy(ID_SET, "dev", 5, 0)
    with pytest.raises(ValueError, match="toy_ood_compare"):
        ToyMixture((("gsm8k", 1.0),))
    with pytest.raises(ValueError, match="zero"):
        ToyMixture(((ID_SET, 0.0),))
