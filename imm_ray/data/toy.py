"""Synthetic arithmetic word problems: the embedded default's data, no download.

Every family is a chain of comparisons between people ("Ann has 9 more cards than Ben"), answered with one
"X has a + b = c cards." line per comparison; they differ in which side of each comparison is known:

- ``toy_id`` (in-domain, self-improved on): each comparison is stated from the UNKNOWN person's side, so the
  surface cue holds: "more" means add, "fewer" subtract, and the person to compute is the sentence's subject.
  Two comparisons, numbers up to ~130.
- ``toy_ood_compare``: the same words, each comparison stated from the KNOWN person's side ("Ann has 9 more
  cards than Ben", Ann known, asks Ben = Ann - 9): the ID cue is exactly wrong here (the SVAMP-style trap).
- ``toy_ood_distractor``: as ``toy_ood_compare`` with three comparisons, larger numbers and one irrelevant
  sentence with a number before the last comparison: more steps than any ID problem, and the same inverted cue.

The base model is pretrained mostly on the OOD forms (it is competent there: something to lose) and sees the
ID form rarely (partial competence: something to gain). Fitting the ID rationales pushes the shared decision
("which person, which sign") toward the ID cue, which costs OOD accuracy: the paper's superficial
self-improvement, as a property of the world. That is the design; measured, the toy models built so far pick
each step's sign at chance in every family, so it does not yet operate (docs/toy_world.md, "Round 2").

The problem space is split by a hash of the question text alone (:func:`bucket`), whatever the family or seed:
bucket 0 is the test split, bucket 1 the train split (the questions self-improvement samples and trains on),
buckets 2.. the pretraining text. So no question of any toy train or test split can ever be a pretraining
document. Pure Python (``random``, ``hashlib``); the CoT format is the project's (``imm_ray.data.prompts``).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from imm_ray.data.format import build_prompt, format_response
from imm_ray.data.records import Problem

ID_SET = "toy_id"
TOY_SETS: tuple[str, ...] = (ID_SET, "toy_ood_compare", "toy_ood_distractor")
SPLITS: tuple[str, ...] = ("train", "test")
DEFAULT_SIZES: Mapping[str, int] = {"train": 1000, "test": 200}
# The question space is cut into BUCKETS by a hash of the text: one bucket each for the test and the train
# split (each still far larger than any n a run asks for), the rest for pretraining.
BUCKETS = 16
TEST_BUCKET = 0
TRAIN_BUCKET = 1
SPLIT_BUCKETS: Mapping[str, int] = {"test": TEST_BUCKET, "train": TRAIN_BUCKET}

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


def _relations(
    rng: random.Random, people: list[str], start: int, deltas: list[int], obj: str, known_side: bool
) -> tuple[list[str], list[str], int]:
    """Comparison sentences along a chain of people and the step computing each unknown count.

    ``deltas[i]`` is how the count changes from ``people[i]`` (known) to ``people[i + 1]`` (unknown).
    ``known_side=False`` (the ID form) states each relation from the UNKNOWN person's side, "Ann has 9 more
    cards than Ben" with Ben known: "more" means add. ``known_side=True`` (the OOD forms) states it from the
    KNOWN person's side, "Ben has 9 more cards than Ann" with Ben known: "more" means subtract.
    """
    sentences: list[str] = []
    lines: list[str] = []
    total = start
    for i, delta in enumerate(deltas):
        known, unknown = people[i], people[i + 1]
        if known_side:
            word = "fewer" if delta > 0 else "more"
            sentences.append(f"{known} has {abs(delta)} {word} {obj} than {unknown}.")
        else:
            word = "more" if delta > 0 else "fewer"
            sentences.append(f"{unknown} has {abs(delta)} {word} {obj} than {known}.")
        new = total + delta
        lines.append(f"{unknown} has {total} {'+' if delta > 0 else '-'} {abs(delta)} = {new} {obj}.")
        total = new
    return sentences, lines, total


# The step line _relations writes ("Ava has 54 + 3 = 57 cards."), field by field; imm_ray.toy.probe reads it.
STEP_LINE = re.compile(r"(?P<person>[A-Z][a-z]+) has (?P<total>\d+) (?P<sign>[+-]) (?P<amount>\d+) = (?P<result>\d+)")


def _make_id(rng: random.Random) -> _Worked:
    """Two comparisons, each stated from the unknown person's side: "more" means add (the cue)."""
    people = [name for name, _ in _people(rng, 3)]
    obj = rng.choice(_OBJECTS)
    start = rng.randint(10, 69)
    deltas = _changes(rng, start, 2, 2, 29)
    relations, lines, answer = _relations(rng, people, start, deltas, obj, known_side=False)
    sentences = [f"{people[0]} has {start} {obj}.", *relations, f"How many {obj} does {people[-1]} have?"]
    return _Worked(" ".join(sentences), "\n".join(lines), answer)


def _make_compare(rng: random.Random) -> _Worked:
    """Two comparisons in the ID family's words, each stated from the known person's side: "more" means
    subtract. "Ann has 9 more cards than Ben" with Ann known asks for Ben = Ann - 9; the keyword rule the ID
    family rewards ("more" is +, the sentence's subject is the one to compute) is wrong here."""
    people = [name for name, _ in _people(rng, 3)]
    obj = rng.choice(_OBJECTS)
    start = rng.randint(20, 89)
    deltas = _changes(rng, start, 2, 2, 19)
    relations, lines, answer = _relations(rng, people, start, deltas, obj, known_side=True)
    sentences = [f"{people[0]} has {start} {obj}.", *relations, f"How many {obj} does {people[-1]} have?"]
    return _Worked(" ".join(sentences), "\n".join(lines), answer)


_DISTRACTORS = ("{x} has {n} {o2}.", "{x} is {n} years old.", "The shop has {n} {o2} on the shelf.",
                "{x} reads {n} pages a day.")


def _make_distractor(rng: random.Random) -> _Worked:
    """Three comparisons from the known person's side (as ``toy_ood_compare``), larger numbers, and one
    irrelevant sentence with a number in it before the last comparison: more steps than any ID problem, a
    number not to use, and the same inverted cue."""
    names = [name for name, _ in _people(rng, 5)]
    people, other = names[:4], names[4]
    obj, obj2 = rng.sample(_OBJECTS, 2)
    start = rng.randint(30, 99)
    deltas = _changes(rng, start, 3, 2, 39)
    relations, lines, answer = _relations(rng, people, start, deltas, obj, known_side=True)
    distractor = rng.choice(_DISTRACTORS).format(x=other, n=rng.randint(2, 99), o2=obj2)
    relations.insert(rng.randint(0, len(relations) - 1), distractor)  # always before the last comparison
    sentences = [f"{people[0]} has {start} {obj}.", *relations, f"How many {obj} does {people[-1]} have?"]
    return _Worked(" ".join(sentences), "\n".join(lines), answer)


_FAMILIES: Mapping[str, Callable[[random.Random], _Worked]] = {
    TOY_SETS[0]: _make_id,
    TOY_SETS[1]: _make_compare,
    TOY_SETS[2]: _make_distractor,
}


def _check_name(name: str) -> None:
    if name not in _FAMILIES:
        raise ValueError(f"unknown toy set {name!r}; known sets: {', '.join(TOY_SETS)}")


def bucket(question: str) -> int:
    """The bucket of a question: a hash of its text alone (not of the family, split or any seed)."""
    digest = hashlib.blake2b(f"imm-ray-toy/bucket\n{question}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def in_test_bucket(name: str, question: str) -> bool:
    """Whether a question belongs to the test split (``name`` is checked, the bucket ignores it)."""
    _check_name(name)
    return bucket(question) == TEST_BUCKET


def in_pretraining_buckets(question: str) -> bool:
    """Whether a question may appear in pretraining text: in neither the test nor the train bucket."""
    return bucket(question) not in SPLIT_BUCKETS.values()


def _problem(name: str, split: str, index: int, worked: _Worked) -> Problem:
    answer = str(worked.answer)
    return Problem(
        id=f"{name}/{split}/{index}", set_name=name, question=worked.question, answer=answer,
        kind="numeric", solution=format_response(worked.steps, answer),
    )


def load_toy(name: str, split: str, n: int | None = None, seed: int = 0) -> list[Problem]:
    """The first ``n`` distinct problems of a set's split (``n=None``: :data:`DEFAULT_SIZES`).

    Deterministic from ``(name, split, seed)``; a larger ``n`` extends a smaller one. Train and test never
    share a question, nor does either with pretraining (see :func:`bucket`).
    """
    _check_name(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for {name}; known splits: {', '.join(SPLITS)}")
    size = DEFAULT_SIZES[split] if n is None else n
    if size < 0:
        raise ValueError(f"n must be >= 0, got {size}")
    rng = random.Random(f"imm-ray-toy/{name}/{split}/{seed}")
    wanted = SPLIT_BUCKETS[split]
    seen: set[str] = set()
    problems: list[Problem] = []
    while len(problems) < size:
        worked = _FAMILIES[name](rng)
        if worked.question in seen or bucket(worked.question) != wanted:
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
    """An endless, seeded stream of pretraining documents drawn from the mixture: only questions of the
    pretraining buckets, so never a question of any toy train or test split."""
    rng = random.Random(f"imm-ray-toy/pretrain/{seed}")
    names = [name for name, _ in mixture.weights]
    weights = [weight for _, weight in mixture.weights]
    while True:
        name = rng.choices(names, weights)[0]
        worked = _FAMILIES[name](rng)
        if in_pretraining_buckets(worked.question):
            yield document(worked.question, format_response(worked.steps, str(worked.answer)))
