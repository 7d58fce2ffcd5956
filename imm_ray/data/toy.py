"""Synthetic arithmetic word problems: the embedded default's data, no download.

One in-domain (ID) family to self-improve on and two out-of-domain (OOD) families that need the same
two- or three-step addition/subtraction in another surface form:

- ``toy_id``: a "change" story in the present tense. Keywords map to operations one to one
  ("finds 7 more" is +, "gives 5 to" is -), numbers are used in the order they appear.
- ``toy_ood_compare``: a chain of comparisons between people, stated from the known person's side
  ("Ann has 9 more cards than Ben": Ben has 9 fewer), so "more" means subtract: the keyword shortcut the
  ID family rewards is wrong here (the SVAMP-style trap).
- ``toy_ood_distractor``: a past-tense change story with other wording, larger numbers, two or three
  changes, and one irrelevant sentence with a number in it before the last change: "use every number in
  order" and "answer after two steps", which the ID family also rewards, are wrong here.

Splits are disjoint by construction, whatever the seed: a question belongs to the test split iff a hash
of its text falls in the test bucket, and the pretraining mixture draws only from the other buckets.
Pure Python (``random``, ``hashlib``); the CoT format is the project's (``imm_ray.data.prompts``).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from imm_ray.data.prompts import build_prompt, format_response
from imm_ray.data.records import Problem

ID_SET = "toy_id"
TOY_SETS: tuple[str, ...] = (ID_SET, "toy_ood_compare", "toy_ood_distractor")
SPLITS: tuple[str, ...] = ("train", "test")
DEFAULT_SIZES: Mapping[str, int] = {"train": 1000, "test": 200}
# One question in TEST_BUCKETS goes to the test split: the pool of test questions is large enough for any n
# a run asks for, and the train/pretraining side keeps nearly all of the space.
TEST_BUCKETS = 8

_NAMES: tuple[tuple[str, str], ...] = (
    ("Mia", "she"), ("Leo", "he"), ("Ava", "she"), ("Sam", "he"), ("Zoe", "she"), ("Max", "he"),
    ("Lily", "she"), ("Omar", "he"), ("Nina", "she"), ("Ben", "he"), ("Ella", "she"), ("Ravi", "he"),
    ("Kate", "she"), ("Tom", "he"), ("Rosa", "she"), ("Ivan", "he"),
)
_OBJECTS: tuple[str, ...] = (
    "marbles", "apples", "stickers", "coins", "books", "pencils", "cards", "shells", "stamps", "cookies",
    "beads", "toys",
)


@dataclass(frozen=True)
class _Worked:
    """A generated problem before it becomes a :class:`Problem`: question, CoT steps, integer answer."""

    question: str
    steps: str
    answer: int


def _people(rng: random.Random, count: int) -> list[tuple[str, str]]:
    return rng.sample(_NAMES, count)


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _changes(rng: random.Random, start: int, count: int, low: int, high: int) -> list[int]:
    """Signed changes whose running total stays positive (a count of things never goes to zero or below)."""
    deltas: list[int] = []
    total = start
    for _ in range(count):
        amount = rng.randint(low, high)
        sign = 1 if amount >= total or rng.random() < 0.5 else -1
        deltas.append(sign * amount)
        total += sign * amount
    return deltas


def _steps(subject: str, verb: str, start: int, deltas: list[int], obj: str) -> tuple[str, int]:
    """One line per change, each with the equation it computes."""
    lines: list[str] = []
    total = start
    for i, delta in enumerate(deltas):
        new = total + delta
        equation = f"{total} {'+' if delta > 0 else '-'} {abs(delta)} = {new}"
        lines.append(f"{'Then ' if i else ''}{subject} {verb} {equation} {obj}.")
        total = new
    return "\n".join(lines), total


_ID_GAIN = ("{p} finds {n} more {o}.", "{p} buys {n} more {o}.", "{p} gets {n} {o} from {x}.",
            "{x} gives {q} {n} more {o}.")
_ID_LOSS = ("{p} loses {n} {o}.", "{p} gives {n} {o} to {x}.", "{p} sells {n} of the {o}.",
            "{p} uses {n} {o}.")
_OBJ_PRONOUN = {"she": "her", "he": "him"}


def _make_id(rng: random.Random) -> _Worked:
    """Present-tense change story, two changes, numbers in the order they are used."""
    (name, pron), (other, _) = _people(rng, 2)
    obj = rng.choice(_OBJECTS)
    start = rng.randint(10, 69)
    deltas = _changes(rng, start, 2, 2, 29)
    sentences = [f"{name} has {start} {obj}."]
    for i, delta in enumerate(deltas):
        template = rng.choice(_ID_GAIN if delta > 0 else _ID_LOSS)
        text = template.format(p=pron, q=_OBJ_PRONOUN[pron], n=abs(delta), o=obj, x=other)
        sentences.append(f"Then {text}" if i else _cap(text))
    sentences.append(f"How many {obj} does {name} have now?")
    steps, answer = _steps(name, "has", start, deltas, obj)
    return _Worked(" ".join(sentences), steps, answer)


def _make_compare(rng: random.Random) -> _Worked:
    """A chain of two comparisons, each stated from the known person's side: "more" means subtract.

    "Ann has 9 more cards than Ben" asks for Ben = Ann - 9, the opposite of the ID family's "finds 9 more";
    a model that learned the keyword rather than the relation fails here.
    """
    (first, _), (second, _), (third, _) = _people(rng, 3)
    obj = rng.choice(_OBJECTS)
    start = rng.randint(20, 89)
    deltas = _changes(rng, start, 2, 2, 19)
    sentences = [f"{first} has {start} {obj}."]
    lines: list[str] = []
    total = start
    for known, unknown, delta in ((first, second, deltas[0]), (second, third, deltas[1])):
        sentences.append(f"{known} has {abs(delta)} {'fewer' if delta > 0 else 'more'} {obj} than {unknown}.")
        new = total + delta
        lines.append(f"{unknown} has {total} {'+' if delta > 0 else '-'} {abs(delta)} = {new} {obj}.")
        total = new
    sentences.append(f"How many {obj} does {third} have?")
    return _Worked(" ".join(sentences), "\n".join(lines), total)


_DIS_START = ("At first, {s} had {n} {o}.", "{s} started the day with {n} {o}.")
_DIS_GAIN = ("Later, {p} bought {n} more.", "Next, {p} picked up {n} {o}.", "After that, {p} won {n} {o}.")
_DIS_LOSS = ("Later, {p} dropped {n} of them.", "Next, {p} traded away {n} {o}.", "After that, {p} lost {n} {o}.")
_DISTRACTORS = ("{x} had {n} {o2}.", "{s} was {n} years old.", "The shop had {n} {o2} on the shelf.",
                "{x} read {n} pages that day.")


def _make_distractor(rng: random.Random) -> _Worked:
    """Past-tense change story with two or three changes and one irrelevant number sentence."""
    (name, pron), (other, _) = _people(rng, 2)
    obj, obj2 = rng.sample(_OBJECTS, 2)
    start = rng.randint(30, 99)
    deltas = _changes(rng, start, rng.choice((2, 3)), 2, 39)
    sentences = [rng.choice(_DIS_START).format(s=name, n=start, o=obj)]
    for delta in deltas:
        template = rng.choice(_DIS_GAIN if delta > 0 else _DIS_LOSS)
        sentences.append(template.format(p=pron, n=abs(delta), o=obj))
    distractor = rng.choice(_DISTRACTORS).format(x=other, s=name, n=rng.randint(2, 99), o2=obj2)
    sentences.insert(rng.randint(1, len(sentences) - 1), distractor)  # always before the last change
    sentences.append(f"How many {obj} did {name} end up with?")
    steps, answer = _steps(name, "had", start, deltas, obj)
    return _Worked(" ".join(sentences), steps, answer)


_FAMILIES: Mapping[str, Callable[[random.Random], _Worked]] = {
    TOY_SETS[0]: _make_id,
    TOY_SETS[1]: _make_compare,
    TOY_SETS[2]: _make_distractor,
}


def _check_name(name: str) -> None:
    if name not in _FAMILIES:
        raise ValueError(f"unknown toy set {name!r}; known sets: {', '.join(TOY_SETS)}")


def in_test_bucket(name: str, question: str) -> bool:
    """Whether a question belongs to the test split: a hash of (set, text), independent of any seed."""
    digest = hashlib.blake2b(f"{name}\n{question}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % TEST_BUCKETS == 0


def _problem(name: str, split: str, index: int, worked: _Worked) -> Problem:
    answer = str(worked.answer)
    return Problem(
        id=f"{name}/{split}/{index}", set_name=name, question=worked.question, answer=answer,
        kind="numeric", solution=format_response(worked.steps, answer),
    )


def load_toy(name: str, split: str, n: int | None = None, seed: int = 0) -> list[Problem]:
    """The first ``n`` distinct problems of a set's split (``n=None``: :data:`DEFAULT_SIZES`).

    Deterministic from ``(name, split, seed)``; a larger ``n`` extends a smaller one. Train and test never
    share a question (see :func:`in_test_bucket`).
    """
    _check_name(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for {name}; known splits: {', '.join(SPLITS)}")
    size = DEFAULT_SIZES[split] if n is None else n
    if size < 0:
        raise ValueError(f"n must be >= 0, got {size}")
    rng = random.Random(f"imm-ray-toy/{name}/{split}/{seed}")
    want_test = split == "test"
    seen: set[str] = set()
    problems: list[Problem] = []
    while len(problems) < size:
        worked = _FAMILIES[name](rng)
        if worked.question in seen or in_test_bucket(name, worked.question) != want_test:
            continue
        seen.add(worked.question)
        problems.append(_problem(name, split, len(problems), worked))
    return problems


@dataclass(frozen=True)
class ToyMixture:
    """Shares of each family in the pretraining text (normalised; need not sum to one).

    The ID family gets the smallest share on purpose: the base must be only partly competent in-domain, so
    self-improvement has room to raise ID accuracy.
    """

    weights: tuple[tuple[str, float], ...] = ((TOY_SETS[0], 0.1), (TOY_SETS[1], 0.45), (TOY_SETS[2], 0.45))

    def __post_init__(self) -> None:
        for name, weight in self.weights:
            _check_name(name)
            if weight < 0:
                raise ValueError(f"mixture weight of {name} must be >= 0, got {weight}")
        if sum(weight for _, weight in self.weights) <= 0:
            raise ValueError("mixture weights must not all be zero")


def document(problem_question: str, solution: str) -> str:
    """One pretraining document (the tokenizer appends end-of-text): zero-shot prompt, then the response."""
    return build_prompt(problem_question) + solution


def pretraining_documents(seed: int, mixture: ToyMixture = ToyMixture()) -> Iterator[str]:
    """An endless, seeded stream of pretraining documents drawn from the mixture, never a test question."""
    rng = random.Random(f"imm-ray-toy/pretrain/{seed}")
    names = [name for name, _ in mixture.weights]
    weights = [weight for _, weight in mixture.weights]
    while True:
        name = rng.choices(names, weights)[0]
        worked = _FAMILIES[name](rng)
        if not in_test_bucket(name, worked.question):
            yield document(worked.question, format_response(worked.steps, str(worked.answer)))
