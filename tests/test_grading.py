"""Answer extraction and grading: the forms models write, the first-statement rule, math-verify, real data."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from imm_ray import grading
from imm_ray.data.prompts import answer_text, format_response, reference_steps
from imm_ray.data.records import Problem
from imm_ray.data.registry import REGISTRY, load_set
from imm_ray.grading import Grade, LatexVerifier, extract_answer, grade, latex_equal


def _numeric(answer: str) -> Problem:
    return Problem(id="t/test/0", set_name="gsm8k", question="q", answer=answer, kind="numeric")


def _latex(answer: str) -> Problem:
    return Problem(id="t/test/0", set_name="math", question="q", answer=answer, kind="latex")


def _choice(answer: str, choices: tuple[str, ...] = ("12", "16", "18 apples", "24")) -> Problem:
    return Problem(id="t/test/0", set_name="mathqa", question="q", answer=answer, kind="choice", choices=choices)


# ----------------------------------------------------------------------------------------------------------------
# numeric
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("She sells 9 eggs.\nThe answer is 18", "18"),
        ("The answer is $18.", "18"),
        ("The answer is 1,000 dollars", "1000"),
        ("#### 72", "72"),
        ("so it is $\\boxed{72}$.", "72"),
        ("The answer is: 3/4", "0.75"),
        ("The answer is $\\frac{3}{4}$", "0.75"),
        ("The answer is 0.750", "0.75"),
        ("The answer is -5 degrees.", "-5"),
        ("The answer is 25%", "25"),
        ("The answer is 15 * 8 = 120 pints", "120"),
        ("The answer is:\n42", "42"),
        ("**The final answer is 7**", "7"),
        ("Answer: 8", "8"),
        ("The answer is 3:30 p.m.", "3:30pm"),
        ("The answer is -(1/3)", "-0.3333333333"),
    ],
)
def test_numeric_forms(completion, expected):
    assert extract_answer(completion, "numeric") == expected


def test_numeric_grading_normalises_and_tolerates_rounding_noise():
    assert grade(_numeric("1000"), "The answer is $1,000.00.").correct
    assert grade(_numeric("0.6666666667"), "The answer is 2/3").correct
    assert not grade(_numeric("0.6666666667"), "The answer is 0.67").correct
    assert grade(_numeric("18"), "The answer is 19") == Grade("19", False)


def test_first_answer_line_wins_over_later_blocks_and_inline_phrases():
    completion = (
        "Half of 48 is 24, so the answer is 24 clips in May.\n"
        "Altogether 48 + 24 = 72.\nThe answer is 72\n"
        "Question: Tom has 5 pens...\nA: Let's think step by step.\nThe answer is 5"
    )
    assert grade(_numeric("72"), completion) == Grade("72", True)
    # the answer line of a made-up next block is not this response's answer
    made_up = "So she sold 72 clips.\nQuestion: Tom has 5 pens.\nThe answer is 5"
    assert extract_answer(made_up, "numeric") is None
    assert extract_answer(made_up, "numeric", last_number_fallback=True) == "72"
    # no stop string, the model just went on: still the first answer line
    assert extract_answer("The answer is 72\nWait, the answer is 70.\nThe answer is 70", "numeric") == "72"


def test_last_number_fallback_only_where_configured():
    completion = "48 / 2 = 24 and 48 + 24 = 72"
    assert extract_answer(completion, "numeric") is None
    assert grade(_numeric("72"), completion) == Grade(None, False)
    assert grade(_numeric("72"), completion, last_number_fallback=True) == Grade("72", True)
    assert extract_answer("so each gets 3/4", "numeric", last_number_fallback=True) == "0.75"
    assert extract_answer("I pick (B), no, (D)", "choice", last_number_fallback=True) == "D"
    assert extract_answer("I pick (B), no, (D)", "choice") is None


def test_asdiv_text_and_time_answers():
    assert grade(_numeric("Mrs. Hilt"), "Jacob has 34 cents.\nThe answer is Mrs. Hilt.").correct
    assert grade(_numeric("Mrs. Hilt"), "The answer is Mrs. Hilt, who has 12 cents more").correct
    assert not grade(_numeric("Mrs. Hilt"), "The answer is Jacob").correct
    assert grade(_numeric("They are equal"), "The answer is they are equal").correct
    assert grade(_numeric("No"), "The answer is no.").correct
    assert not grade(_numeric("No"), "The answer is not enough information").correct
    assert grade(_numeric("3:30 p.m."), "The answer is 3:30 pm").correct
    assert not grade(_numeric("3:30 p.m."), "The answer is 3:00 pm").correct
    assert grade(_numeric("5:6"), "The answer is 5 : 6").correct
    assert grade(_numeric("-(1/3)"), "The answer is -1/3").correct


# ----------------------------------------------------------------------------------------------------------------
# multiple choice
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion",
    [
        "The answer is (C)",
        "The answer is C",
        "The answer is C.",
        "The answer is c)",
        "The answer is (c) 18 apples",
        "Answer: (c)",
        "The answer is option C",
        "The answer is $\\boxed{C}$",
        "The answer is 18 apples",  # the option's text
        "The answer is 18",  # the option's value
        "(C)",
        "The answer is: option ' c '",
    ],
)
def test_choice_forms(completion):
    assert grade(_choice("C"), completion) == Grade("C", True)


def test_choice_wrong_and_ambiguous():
    assert grade(_choice("C"), "The answer is (A)") == Grade("A", False)
    assert extract_answer("The answer is a number bigger than 10", "choice") is None
    assert extract_answer("The answer is 20", "choice", choices=("12", "16", "18", "24")) is None
    assert extract_answer("The answer is (F)", "choice", choices=("1", "2", "3", "4")) is None


# ----------------------------------------------------------------------------------------------------------------
# LaTeX (MATH)
# ----------------------------------------------------------------------------------------------------------------


def test_latex_extraction_forms():
    assert extract_answer("The answer is $\\boxed{\\frac{211}{243}}$", "latex") == "\\frac{211}{243}"
    assert extract_answer("so $\\boxed{x^{2}+\\frac{1}{2}}$.", "latex") == "x^{2}+\\frac{1}{2}"
    assert extract_answer("The answer is 63π", "latex") == "63π"
    assert extract_answer("The answer is $\\sqrt{2}$.", "latex") == "\\sqrt{2}"
    # the answer line beats boxes written in the steps, and a later hallucinated block is ignored
    steps = "First $\\boxed{3}$ then more.\nThe answer is $\\boxed{4}$\nInstruction: ... \\boxed{5}"
    assert extract_answer(steps, "latex") == "4"
    # without an answer line in the response block, the answer line of a made-up next block does not count
    assert extract_answer("so $\\boxed{4}$.\n\nQuestion: next one\nThe answer is 9", "latex") == "4"
    assert extract_answer("no answer here", "latex") is None


@pytest.mark.parametrize(
    ("gold", "said", "equal"),
    [
        ("\\frac{1}{2}", "0.5", True),
        ("\\dfrac{1}{2}", "1/2", True),
        ("63\\pi", "63π", True),
        ("3\\sqrt{2}", "\\sqrt{18}", True),
        ("(0,1]", "(0,1)", False),
        ("x^2+1", "1+x^2", True),
        ("\\text{(C)}", "C", True),
        ("5", "6", False),
    ],
)
def test_latex_equivalence_with_math_verify(gold, said, equal):
    assert grade(_latex(gold), f"The answer is $\\boxed{{{said}}}$").correct is equal


def test_math_verify_runs_in_worker_threads():
    # Ray runs tasks in threads, where math-verify's own SIGALRM timeout would raise.
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(latex_equal("\\frac{2}{4}", "0.5"))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True, True, True]


def test_a_comparison_past_the_time_limit_is_killed_and_graded_wrong():
    verifier = LatexVerifier()
    try:
        assert verifier.equivalent("\\frac{2}{4}", "0.5") is True
        assert verifier.equivalent("(x+1)^{40}", "x^{40}+1", timeout_s=1e-4) is None  # cannot finish in 0.1 ms
        assert verifier.equivalent("\\frac{2}{4}", "0.5") is True  # a fresh child took over
    finally:
        verifier.close()


# ----------------------------------------------------------------------------------------------------------------
# Real benchmark files: each record's own answer grades right, another answer grades wrong
# ----------------------------------------------------------------------------------------------------------------


def _shared_data() -> Path | None:
    override = os.environ.get("IMM_RAY_SHARED_DATA")
    candidates = [Path(override)] if override else []
    candidates += [ancestor / "shared" / "data" for ancestor in Path(__file__).resolve().parents]
    return next((c for c in candidates if (c / "gsm8k" / "test.jsonl").is_file()), None)


SHARED = _shared_data()
needs_shared = pytest.mark.skipif(SHARED is None, reason="shared/data not found (set IMM_RAY_SHARED_DATA)")
NO_STEPS = "Let's work it out from the numbers in the question."
# Required shares; GSM8K's reference answers must all grade right.
REFERENCE_MIN = {name: 0.995 for name in REGISTRY} | {"gsm8k": 1.0}
WRONG_MIN = 0.995
# MATH: math-verify compares every wrong answer in the child process, ~10 ms each (47 s for all 5,000 on the
# 2-core machine), so the wrong-answer test takes every 10th MATH record; the reference test takes all 5,000.
WRONG_STRIDE = {"math": 10}


def _model_style(problem: Problem, answer: str) -> str:
    """A completion as a model writes one: the record's reasoning steps, then "The answer is X"."""
    return format_response(reference_steps(problem) or NO_STEPS, answer)


def _wrong_answer(problems: list[Problem], index: int) -> str:
    """Another record's gold that differs from this one (the next letter for multiple choice)."""
    problem = problems[index]
    if problem.kind == "choice":
        return "ABCDEFGHIJ"[("ABCDEFGHIJ".index(problem.answer) + 1) % len(problem.choices)]
    key = grading.canonical_numeric if problem.kind == "numeric" else grading.latex_key
    for step in range(1, len(problems)):
        other = problems[(index + step) % len(problems)]
        if key(other.answer) != key(problem.answer):
            return f"$\\boxed{{{other.answer}}}$" if problem.kind == "latex" else other.answer
    raise AssertionError("every record has the same answer")


def _wrong_style(problem: Problem, answer: str) -> str:
    """The record's steps minus any line already stating an answer (MathQA rationales hold "answer : c"),
    then a wrong answer line: a model that reasoned and then committed to a wrong answer."""
    lines = (reference_steps(problem) or NO_STEPS).split("\n")
    steps = "\n".join(line for line in lines if not grading.ANSWER_LINE.match(line))
    return format_response(steps or NO_STEPS, answer)


@needs_shared
@pytest.mark.parametrize("name", list(REGISTRY))
def test_reference_answers_grade_correct(name):
    problems = load_set(name, path=SHARED / name / "test.jsonl")
    correct = sum(grade(p, _model_style(p, answer_text(p))).correct for p in problems)
    assert correct / len(problems) >= REFERENCE_MIN[name], f"{name}: {correct}/{len(problems)}"


@needs_shared
@pytest.mark.parametrize("name", list(REGISTRY))
def test_wrong_answers_grade_wrong(name):
    problems = load_set(name, path=SHARED / name / "test.jsonl")
    picked = range(0, len(problems), WRONG_STRIDE.get(name, 1))
    wrong = sum(not grade(problems[i], _wrong_style(problems[i], _wrong_answer(problems, i))).correct for i in picked)
    assert wrong / len(picked) >= WRONG_MIN, f"{name}: {wrong}/{len(picked)}"


@needs_shared
def test_other_shared_files_grade_too():
    for name, file in (("sat_math", "agieval_sat-math.jsonl"), ("math", "test500_math_oai.jsonl")):
        problems = load_set(name, path=SHARED / name / file)
        correct = sum(grade(p, _model_style(p, answer_text(p))).correct for p in problems)
        assert correct / len(problems) >= 0.995, f"{file}: {correct}/{len(problems)}"
