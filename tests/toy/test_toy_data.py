"""The toy families: deterministic, disjoint splits (and disjoint from pretraining), correct solutions, and the
world's documented properties (docs/toy_world.md): the ID cue holds in-domain and is inverted out of domain."""

from __future__ import annotations

import itertools
import re

import pytest

from imm_ray.data.prompts import ANSWER_PREFIX, HEADER, RESPONSE_PREFIX, build_prompt
from imm_ray.data.toy import (
    _OBJECTS,
    BUCKETS,
    DEFAULT_SIZES,
    ID_SET,
    TEST_BUCKET,
    TOY_SETS,
    TRAIN_BUCKET,
    ToyMixture,
    bucket,
    in_pretraining_buckets,
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


def _question(document: str) -> str:
    """The question of a pretraining document (between the instruction line and the response)."""
    body = document[document.index("Instruction:\n") + len("Instruction:\n") : document.index(RESPONSE_PREFIX)]
    return body.strip()


def test_pretraining_never_shows_a_train_or_test_question() -> None:
    """Pretraining draws only from buckets 2..: no question of any toy train or test split (any seed) can be
    a pretraining document. Checked on the stream itself and on the splits a run can ask for."""
    assert BUCKETS > 2 and {TEST_BUCKET, TRAIN_BUCKET} == {0, 1}
    documents = list(itertools.islice(pretraining_documents(0), 4000))
    assert all(doc.startswith(HEADER) and RESPONSE_PREFIX in doc for doc in documents)
    questions = {_question(doc) for doc in documents}
    assert all(bucket(q) >= 2 and in_pretraining_buckets(q) for q in questions)
    split_questions = {
        p.question for name in TOY_SETS for seed in (0, 1) for split, n in (("train", 1000), ("test", 400))
        for p in load_toy(name, split, n, seed)
    }
    assert not questions & split_questions
    assert not any(in_pretraining_buckets(q) for q in split_questions)
    prompts = {doc[: doc.index(RESPONSE_PREFIX) + len(RESPONSE_PREFIX)] for doc in documents}
    assert not prompts & {build_prompt(q) for q in split_questions}


def test_buckets_ignore_the_family() -> None:
    """A question's bucket is a function of its text alone, so a text two families could share still lands in
    one place; the families' texts never coincide anyway."""
    question = load_toy(ID_SET, "test", 1, 0)[0].question
    assert all(in_test_bucket(name, question) for name in TOY_SETS)
    texts = [{p.question for p in load_toy(name, "train", 300, 0)} for name in TOY_SETS]
    assert not any(a & b for a, b in itertools.combinations(texts, 2))


def test_mixture_shares_are_followed() -> None:
    mixture = ToyMixture(((TOY_SETS[0], 1.0), (TOY_SETS[1], 0.0), (TOY_SETS[2], 0.0)))
    documents = list(itertools.islice(pretraining_documents(5, mixture), 50))
    assert all(_role_skeleton(_question(doc)).startswith("A has # o. B has # ") for doc in documents)  # ID form
    assert all((doc.count(" + ") + doc.count(" - ")) == 2 for doc in documents)  # two steps


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


_NAME = re.compile(r"\b(?!How\b|The\b)[A-Z][a-z]+\b")


def _role_skeleton(question: str) -> str:
    """A question with numbers blanked, objects as "o", and each person named by role: A, B, ... in order of
    first mention. What is left is the form: who is known and from whose side each comparison is stated."""
    text = re.sub(r"\d+", "#", question)
    text = re.sub(r"\b(" + "|".join(_OBJECTS) + r")\b", "o", text)
    roles: dict[str, str] = {}
    return _NAME.sub(lambda m: roles.setdefault(m.group(0), "ABCDEFG"[len(roles)]), text)


def _comparisons(question: str) -> list[tuple[str, str, str]]:
    """(subject, "more"/"fewer", object person) of each comparison sentence, in order."""
    return re.findall(r"([A-Z][a-z]+) has \d+ (more|fewer) \w+ than ([A-Z][a-z]+)\.", question)


def test_families_differ_in_form_not_words() -> None:
    """Same vocabulary, other forms: ID states each comparison from the unknown side, the OOD families from the
    known side; the distractor family has three steps and one irrelevant sentence; larger numbers."""
    skeletons = {name: {_role_skeleton(p.question) for p in load_toy(name, "train", 300, 0)} for name in TOY_SETS}
    for a, b in itertools.combinations(TOY_SETS, 2):
        assert not skeletons[a] & skeletons[b], (a, b)
    assert all(s.startswith("A has # o. B has # ") for s in skeletons[ID_SET])
    assert all(s.startswith("A has # o. A has # ") for s in skeletons["toy_ood_compare"])
    steps = {name: {(p.solution or "").count("\n") for p in load_toy(name, "train", 300, 0)} for name in TOY_SETS}
    assert steps[ID_SET] == steps["toy_ood_compare"] == {2}  # two steps plus the answer line
    assert steps["toy_ood_distractor"] == {3}  # more steps than any ID problem
    biggest = {name: max(int(p.answer) for p in load_toy(name, "train", 300, 0)) for name in TOY_SETS}
    assert biggest["toy_ood_distractor"] > 150 > biggest[ID_SET]  # other number ranges


@pytest.mark.parametrize("name", TOY_SETS)
def test_the_id_cue_holds_in_domain_and_misleads_out_of_domain(name: str) -> None:
    """The cue the ID family rewards: "more" is +, "fewer" is -, and the line computes the sentence's subject.
    It holds in every ID step and fails in every OOD step (there "more" is -, and the line computes the
    person after "than")."""
    for problem in load_toy(name, "train", 200, 0):
        lines = (problem.solution or "").split("\n")[:-1]
        relations = _comparisons(problem.question)
        assert len(relations) == len(lines)
        for (subject, word, other), line in zip(relations, lines, strict=True):
            computed, op = re.match(r"([A-Z][a-z]+) has \d+ ([+-]) ", line).groups()  # type: ignore[union-attr]
            cue_holds = (op == "+") == (word == "more") and computed == subject
            cue_fails = (op == "-") == (word == "more") and computed == other
            assert cue_holds if name == ID_SET else cue_fails, (problem.question, line)


def test_distractor_adds_one_unused_number_before_the_last_comparison() -> None:
    for problem in load_toy("toy_ood_distractor", "train", 100, 0):
        steps = (problem.solution or "").split("\n")[:-1]
        numbers = re.findall(r"\d+", problem.question)
        assert len(numbers) == len(steps) + 2  # start, one per comparison, one irrelevant
        sentences = problem.question.split(". ")
        irrelevant = [i for i, s in enumerate(sentences[1:], 1) if re.search(r"\d", s) and " than " not in s]
        last = max(i for i, s in enumerate(sentences) if " than " in s)
        assert len(irrelevant) == 1 and irrelevant[0] < last


def test_unknown_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="toy_id"):
        load_toy("toy_nope", "train", 5, 0)
    with pytest.raises(ValueError, match="train, test"):
        load_toy(ID_SET, "dev", 5, 0)
    with pytest.raises(ValueError, match="toy_ood_compare"):
        ToyMixture((("gsm8k", 1.0),))
    with pytest.raises(ValueError, match="zero"):
        ToyMixture(((ID_SET, 0.0),))
