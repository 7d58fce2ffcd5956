"""The paper's few-shot chain-of-thought prompt format (../shared/PROMPTS.md, Appendix A.1).

One format is used for generation, SFT data and evaluation: the SFT pairs are ``(build_prompt(q), response)``
and the loss falls on the response only.

Few-shot prompts (:func:`make_prompter`) follow the paper: ten worked examples for GSM8K and MATH, the ones the
paper prints (:data:`GSM8K_PAPER_EXEMPLARS`, :data:`MATH_PAPER_EXEMPLARS`, verbatim, LaTeX included) first,
the rest drawn by a seed from the same set's TRAIN split, never from a test split. Where the exemplars of each
set come from (:func:`exemplar_plan`):

- gsm8k, math: the paper's printed exemplars, then their own train split;
- the numeric OOD sets (mawps, svamp, asdiv): the GSM8K exemplars, as the paper evaluates OOD with the
  ID prompt;
- the multiple-choice sets (sat_math, mathqa, mmlu_stem): the same GSM8K exemplars, each turned into a
  multiple-choice question (its gold answer among three near-miss numbers, "Answer Choices: (A) .. (D) ..")
  answered "The answer is <letter>", so the model sees the reasoning format and the answer format the grader
  reads for these sets;
- toy sets: their own generated train split (no paper exemplars).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from imm_ray.data import registry
from imm_ray.data.format import (  # noqa: F401 (the format, re-exported with the exemplar machinery)
    ANSWER_PREFIX,
    HEADER,
    RESPONSE_PREFIX,
    STOP_STRINGS,
    build_prompt,
    format_exemplar,
    format_response,
)
from imm_ray.data.records import Problem
from imm_ray.data.registry import DataError, format_choices, load_set


@dataclass(frozen=True)
class Exemplar:
    """One worked example before formatting: question, chain-of-thought steps, final answer text."""

    question: str
    steps: str
    answer: str

    def render(self) -> str:
        return format_exemplar(self.question, self.steps, self.answer)


# The exemplars printed in the paper (Tables 11 and 12), verbatim: the PDF's blank lines between sentences
# become single newlines, the text and LaTeX are unchanged (the second MATH exemplar really ends "63π").
GSM8K_PAPER_EXEMPLARS: tuple[Exemplar, ...] = (
    Exemplar(
        question=(
            "Angelo and Melanie want to plan how many hours over the next week they should study together "
            "for their test next week. They have 2 chapters of their textbook to study and 4 worksheets "
            "to memorize. They figure out that they should dedicate 3 hours to each chapter of their "
            "textbook and 1.5 hours for each worksheet. If they plan to study no more than 4 hours each "
            "day, how many days should they plan to study total over the next week if they take a "
            "10-minute break every hour, include 3 10-minute snack breaks each day, and 30 minutes for "
            "lunch each day?"
        ),
        steps=(
            r"Angelo and Melanie think they should dedicate 3 hours to each of the 2 chapters, $3 \text{ "
            r"hours} \times 2 \text{ chapters} = 6 \text{ hours total}$." "\n"
            r"For the worksheets they plan to dedicate 1.5 hours for each worksheet, $1.5 \text{ hours} "
            r"\times 4 \text{ worksheets} = 6 \text{ hours total}$." "\n"
            "Angelo and Melanie need to start with planning 12 hours to study, at 4 hours a day, $12 / 4 "
            r"= 3 \text{ days}$." "\n"
            "However, they need to include time for breaks and lunch. Every hour they want to include a "
            r"10-minute break, so 12 total hours $\times 10 \text{ minutes} = 120 \text{ extra minutes for "
            "breaks}$." "\n"
            r"They also want to include 3 10-minute snack breaks, $3 \times 10 \text{ minutes} = 30 \text{ "
            "minutes}$." "\n"
            r"And they want to include 30 minutes for lunch each day, so $120 \text{ minutes for breaks} + "
            r"30 \text{ minutes for snack breaks} + 30 \text{ minutes for lunch} = 180 \text{ minutes}$, "
            r"or $180 / 60 \text{ minutes per hour} = 3 \text{ extra hours}$." "\n"
            "So Angelo and Melanie want to plan 12 hours to study + 3 hours of breaks = 15 hours total." "\n"
            r"They want to study no more than 4 hours each day, $15 \text{ hours} / 4 \text{ hours each "
            "day} = 3.75$" "\n"
            "They will need to plan to study 4 days to allow for all the time they need."
        ),
        answer="4",
    ),
    Exemplar(
        question=(
            "Mark's basketball team scores 25 2 pointers, 8 3 pointers and 10 free throws. Their "
            "opponents score double the 2 pointers but half the 3 pointers and free throws. What's the "
            "total number of points scored by both teams added together?"
        ),
        steps=(
            r"Mark's team scores 25 2 pointers, meaning they scored $25 \times 2 = 50$ points in 2 "
            "pointers." "\n"
            r"His team also scores 8 3 pointers, meaning they scored $8 \times 3 = 24$ points in 3 "
            "pointers" "\n"
            r"They scored 10 free throws, and free throws count as one point so they scored $10 \times 1 = "
            "10$ points in free throws." "\n"
            "All together his team scored $50 + 24 + 10 = 84$ points" "\n"
            "Mark's opponents scored double his team's number of 2 pointers, meaning they scored $50 "
            r"\times 2 = 100$ points in 2 pointers." "\n"
            "His opponents scored half his team's number of 3 pointers, meaning they scored $24 / 2 = 12$ "
            "points in 3 pointers." "\n"
            "They also scored half Mark's team's points in free throws, meaning they scored $10 / 2 = 5$ "
            "points in free throws." "\n"
            "All together Mark's opponents scored $100 + 12 + 5 = 117$ points" "\n"
            "The total score for the game is both team's scores added together, so it is $84 + 117 = 201$ "
            "points"
        ),
        answer="201",
    ),
    Exemplar(
        question=(
            "Bella has two times as many marbles as frisbees. She also has 20 more frisbees than deck "
            "cards. If she buys 2/5 times more of each item, what would be the total number of the items "
            "she will have if she currently has 60 marbles?"
        ),
        steps=(
            "When Bella buys 2/5 times more marbles, she'll have increased the number of marbles by $2/5 "
            r"\times 60 = 24$" "\n"
            "The total number of marbles she'll have is $60 + 24 = 84$" "\n"
            "If Bella currently has 60 marbles, and she has two times as many marbles as frisbees, she "
            "has $60 / 2 = 30$ frisbees." "\n"
            r"If Bella buys 2/5 times more frisbees, she'll have $2/5 \times 30 = 12$ more frisbees." "\n"
            "The total number of frisbees she'll have will increase to $30 + 12 = 42$" "\n"
            "Bella also has 20 more frisbees than deck cards, meaning she has $30 - 20 = 10$ deck cards" "\n"
            r"If she buys 2/5 times more deck cards, she'll have $2/5 \times 10 = 4$ more deck cards." "\n"
            "The total number of deck cards she'll have is $10 + 4 = 14$" "\n"
            "Together, Bella will have a total of $14 + 42 + 84 = 140$ items"
        ),
        answer="140",
    ),
)

MATH_PAPER_EXEMPLARS: tuple[Exemplar, ...] = (
    Exemplar(
        question=(
            "Kevin Kangaroo begins hopping on a number line at 0. He wants to get to 1, but he can hop "
            r"only $\frac{1}{3}$ of the distance. Each hop tires him out so that he continues to hop "
            r"$\frac{1}{3}$ of the remaining distance. How far has he hopped after five hops? Express your "
            "answer as a common fraction."
        ),
        steps=(
            r"Kevin hops $\frac{1}{3}$ of the remaining distance with every hop." "\n"
            r"His first hop takes $\frac{1}{3}$ closer." "\n"
            r"For his second hop, he has $\frac{2}{3}$ left to travel, so he hops forward "
            r"$(\frac{2}{3})(\frac{1}{3})$." "\n"
            r"For his third hop, he has $(\frac{2}{3})^2$ left to travel, so he hops forward "
            r"$(\frac{2}{3})^2(\frac{1}{3})$." "\n"
            r"In general, Kevin hops forward $(\frac{2}{3})^{k-1}(\frac{1}{3})$ on his k th hop." "\n"
            "We want to find how far he has hopped after five hops." "\n"
            r"This is a finite geometric series with first term $\frac{1}{3}$, common ratio $\frac{2}{3}$, "
            "and five terms." "\n"
            r"Thus, Kevin has hopped $\frac{\frac{1}{3}(1-(\frac{2}{3})^5)}{1-\frac{2}{3}} = "
            r"\boxed{\frac{211}{243}}$."
        ),
        answer=r"$\boxed{\frac{211}{243}}$",
    ),
    Exemplar(
        question=(
            "What is the area of the region defined by the equation $x^2 + y^2 - 7 = 4y - 14x + 3$?"
        ),
        steps=(
            "We rewrite the equation as $x^2 + 14x + y^2 - 4y = 10$ and then complete the square," "\n"
            "resulting in $(x + 7)^2 - 49 + (y - 2)^2 - 4 = 10$," "\n"
            "or $(x + 7)^2 + (y - 2)^2 = 63$." "\n"
            r"This is the equation of a circle with center $(-7, 2)$ and radius $\sqrt{63}$," "\n"
            r"so the area of this region is $\pi r^2 = \boxed{63\pi}$."
        ),
        answer="63π",
    ),
    Exemplar(
        question=(
            "If $x^2 + y^2 = 1$, what is the largest possible value of $|x| + |y|$?"
        ),
        steps=(
            "If (x, y) lies on the circle," "\n"
            "so does $(x, -y)$, $(-x, y)$, and $(-x, -y)$, (which all give the same value of $|x| + "
            "|y|$)," "\n"
            r"so we can assume that $x \geq 0$ and $y \geq 0$." "\n"
            "Then $|x| + |y| = x + y$. Squaring, we get" "\n"
            "$(x + y)^2 = x^2 + 2xy + y^2 = 1 + 2xy$." "\n"
            r"Note that $(x - y)^2 \geq 0$." "\n"
            r"Expanding, we get $x^2 - 2xy + y^2 \geq 0$, so $2xy \leq x^2 + y^2 = 1$." "\n"
            r"Hence, $1 + 2xy \leq 2$, which means $x + y \leq \sqrt{2}$." "\n"
            r"Equality occurs when $x = y = \frac{1}{\sqrt{2}}$," "\n"
            r"so the maximum value of $|x| + |y|$ is $\boxed{\sqrt{2}}$."
        ),
        answer=r"$\boxed{\sqrt{2}}$",
    ),
)

PAPER_NUM_SHOTS = 10
# Drawn exemplars longer than this are skipped: a 10-shot MATH prompt must fit the 4k-8k contexts of the
# paper's models (MATH solutions average ~550 characters; a few run past 5,000 with Asymptote figures).
MAX_EXEMPLAR_CHARS = 1500
CHOICE_EXEMPLAR_OPTIONS = 4

ExemplarStyle = Literal["plain", "choice"]


@dataclass(frozen=True)
class ExemplarPlan:
    """Where a set's few-shot exemplars come from: fixed ones first, then draws from ``source``'s train split."""

    source: str
    fixed: tuple[Exemplar, ...]
    style: ExemplarStyle = "plain"


class ChatTemplateTokenizer(Protocol):
    """What :func:`make_prompter` needs of a transformers tokenizer for instruct models."""

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


def exemplar_plan(set_name: str) -> ExemplarPlan:
    """The exemplar source of a set (see the module docstring); unknown sets raise the registry's DataError."""
    registry.require_known(set_name)
    if set_name == "gsm8k":
        return ExemplarPlan("gsm8k", GSM8K_PAPER_EXEMPLARS)
    if set_name == "math":
        return ExemplarPlan("math", MATH_PAPER_EXEMPLARS)
    if registry.is_toy(set_name):
        return ExemplarPlan(set_name, ())
    style: ExemplarStyle = "choice" if registry.get_spec(set_name).kind == "choice" else "plain"
    return ExemplarPlan("gsm8k", GSM8K_PAPER_EXEMPLARS, style)


# ----------------------------------------------------------------------------------------------------------------
# Reference responses
# ----------------------------------------------------------------------------------------------------------------


def answer_text(problem: Problem) -> str:
    """The gold answer as the answer line writes it: MATH answers boxed, as the paper's MATH exemplars do."""
    return f"$\\boxed{{{problem.answer}}}$" if problem.kind == "latex" else problem.answer


def _clean_steps(text: str) -> str:
    """Reference text made safe as a response: runs of blank lines collapsed (three newlines are a stop string)."""
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def reference_steps(problem: Problem) -> str | None:
    """The steps of a problem's reference solution without any final answer line, or None if it has none."""
    if not problem.solution:
        return None
    steps = _clean_steps(problem.solution)
    # Toy solutions already end with the answer line; drop it so the caller's answer line is the only one.
    lines = steps.split("\n")
    if lines[-1].startswith(ANSWER_PREFIX):
        steps = "\n".join(lines[:-1]).strip()
    return steps or None


def reference_response(problem: Problem) -> str | None:
    """A problem's reference solution in the response format (steps, then "The answer is X"); None without one.

    Used for SFT on reference data, analysis (layer importance on a reasoning set) and as few-shot exemplars.
    """
    steps = reference_steps(problem)
    return None if steps is None else format_response(steps, answer_text(problem))


# ----------------------------------------------------------------------------------------------------------------
# Exemplar selection
# ----------------------------------------------------------------------------------------------------------------


def _question_key(question: str) -> str:
    return " ".join(question.split()).lower()


def _eligible(problem: Problem, steps: str | None) -> bool:
    """A train record can be an exemplar if it has steps, is not too long, has no figure and no stop string."""
    if steps is None or len(steps) > MAX_EXEMPLAR_CHARS or "[asy]" in steps or "[asy]" in problem.question:
        return False
    rendered = format_exemplar(problem.question, steps, answer_text(problem)).rstrip("\n")
    return not any(stop in rendered for stop in STOP_STRINGS)


def draw_exemplars(
    source: str, count: int, *, seed: int, exclude: Sequence[Exemplar] = (), data_dir: str | Path | None = None
) -> tuple[Exemplar, ...]:
    """``count`` exemplars from ``source``'s TRAIN split, in an order fixed by ``seed``."""
    if count <= 0:
        return ()

    try:
        train = load_set(source, "train", data_dir=data_dir, seed=seed)
    except DataError as error:
        raise DataError(
            f"few-shot exemplars are drawn from the {source} train split, which could not be loaded: {error}. "
            f"Provide it (data_dir= / $IMM_RAY_DATA_DIR) or ask for fewer shots"
        ) from error
    taken = {_question_key(exemplar.question) for exemplar in exclude}
    order = list(range(len(train)))
    random.Random(f"imm-ray/exemplars/{source}/{seed}").shuffle(order)
    drawn: list[Exemplar] = []
    for index in order:
        problem = train[index]
        steps = reference_steps(problem)
        if _question_key(problem.question) in taken or not _eligible(problem, steps):
            continue
        drawn.append(Exemplar(problem.question, steps or "", answer_text(problem)))
        if len(drawn) == count:
            break
    if len(drawn) < count:
        raise DataError(f"the {source} train split has only {len(drawn)} usable exemplars; {count} were asked for")
    return tuple(drawn)


def as_choice_exemplar(exemplar: Exemplar, rng: random.Random) -> Exemplar:
    """A numeric exemplar as a multiple-choice one: its answer among near misses, answered by letter."""

    gold = exemplar.answer
    options = [gold, *_near_misses(gold, CHOICE_EXEMPLAR_OPTIONS - 1, rng)]
    rng.shuffle(options)
    letter = "ABCDEFGHIJ"[options.index(gold)]
    return Exemplar(format_choices(exemplar.question, tuple(options)), exemplar.steps, letter)


def _near_misses(gold: str, count: int, rng: random.Random) -> list[str]:
    """Wrong options that look like the gold number (off by a little, doubled, halved)."""
    try:
        value = float(gold.replace(",", ""))
    except ValueError:
        return [f"{gold} + {offset}" for offset in range(1, count + 1)]
    step = 1 if value == int(value) else 0.5
    pool = {value + step * offset for offset in (-3, -2, -1, 1, 2, 3)} | {value * 2, value / 2}
    pool = {candidate for candidate in pool if candidate != value and (candidate >= 0 or value < 0)}
    chosen = rng.sample(sorted(pool), count)
    return [str(int(c)) if c == int(c) else f"{c:g}" for c in chosen]


def select_exemplars(
    set_name: str, *, num_shots: int, seed: int, data_dir: str | Path | None = None
) -> tuple[Exemplar, ...]:
    """The candidate exemplars of a set in prompt order: ``num_shots`` of them plus one spare.

    The spare replaces an exemplar whose question is the question being asked (generation runs on the train
    split the exemplars come from). Up to the number of printed exemplars no train split is needed.
    """
    if num_shots < 0:
        raise ValueError(f"num_shots must be >= 0, got {num_shots}")
    if num_shots == 0:
        return ()
    plan = exemplar_plan(set_name)
    fixed = plan.fixed[: num_shots + 1]  # the printed ones, plus one spare where the paper printed more
    missing = num_shots - min(num_shots, len(plan.fixed))
    # No train split is read when the printed exemplars suffice (then, at exactly their number, no spare).
    drawn = (
        draw_exemplars(plan.source, missing + 1, seed=seed, exclude=plan.fixed, data_dir=data_dir) if missing else ()
    )
    candidates = (*fixed, *drawn)
    if plan.style == "choice":
        rng = random.Random(f"imm-ray/choice-exemplars/{set_name}/{seed}")
        candidates = tuple(as_choice_exemplar(exemplar, rng) for exemplar in candidates)
    return candidates


def _exemplars_for(problem: Problem, candidates: Sequence[Exemplar], num_shots: int) -> list[str]:
    asked = _question_key(problem.question)
    usable = [exemplar for exemplar in candidates if _question_key(exemplar.question) != asked]
    return [exemplar.render() for exemplar in usable[:num_shots]]


# ----------------------------------------------------------------------------------------------------------------
# Prompters
# ----------------------------------------------------------------------------------------------------------------


def make_prompter(
    set_name: str,
    *,
    num_shots: int,
    seed: int,
    data_dir: str | Path | None = None,
    chat_template_tokenizer: ChatTemplateTokenizer | None = None,
) -> Callable[[Problem], str]:
    """A function from a problem of ``set_name`` to its prompt text.

    ``num_shots=0`` gives exactly ``build_prompt(problem.question)`` (the toy model is pretrained on it); the
    paper uses ``num_shots=10`` (:data:`PAPER_NUM_SHOTS`). Exemplars are chosen once here, so every problem
    gets the same ones (bar the one that would repeat its own question). With ``chat_template_tokenizer`` the
    same content becomes the user turn of the tokenizer's chat template and the response prefix opens the
    assistant turn, so completions have the same format for instruct models.
    """
    candidates = select_exemplars(set_name, num_shots=num_shots, seed=seed, data_dir=data_dir)

    def prompt(problem: Problem) -> str:
        text = build_prompt(problem.question, _exemplars_for(problem, candidates, num_shots))
        return text if chat_template_tokenizer is None else wrap_chat(chat_template_tokenizer, text)

    return prompt


def wrap_chat(tokenizer: ChatTemplateTokenizer, prompt: str) -> str:
    """A plain-format prompt as a chat: everything before the response prefix is the user's message."""
    if not prompt.endswith(RESPONSE_PREFIX):
        raise ValueError("wrap_chat expects a prompt built by build_prompt (ending with the response prefix)")
    user = prompt[: -len(RESPONSE_PREFIX)].strip()
    opened = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    return f"{opened}{RESPONSE_PREFIX}"
