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


@pytest.mark.parametrize("said", ["70000", "70,000", "70000.0", "$70,000", "70,000.00 dollars", "140000/2"])
def test_integer_gold_matches_only_its_exact_value(said):
    assert grade(_numeric("70000"), f"The answer is {said}.").correct


@pytest.mark.parametrize("said", ["70001", "69999", "69999.99", "70000.01", "69999.999999999999", "7000", "700000"])
def test_integer_gold_rejects_any_other_value(said):
    assert not grade(_numeric("70000"), f"The answer is {said}.").correct


@pytest.mark.parametrize(
    ("gold", "said", "correct"),
    [
        # rule 2: a fraction gold is exact; a decimal must be its correct rounding with 4 significant digits
        ("3/7", "6/14", True),
        ("3/7", "0.4286", True),
        ("3/7", "0.428571", True),
        ("3/7", "0.4285", False),
        ("3/7", "0.429", False),
        ("2/3", "0.6667", True),
        ("2/3", "0.67", False),
        ("-(1/3)", "-0.3333", True),
        ("-(1/3)", "0.3333", False),
        ("25/3", "8.333", True),
        ("25/3", "8.33", False),
        ("5/2", "2.5", True),
        ("5/2", "3", False),
        ("5/2", "2.54", False),
        # rule 3: a decimal gold at its own number of places
        ("1.84", "1.840", True),
        ("1.84", "46/25", True),
        ("1.84", "1.8449", True),
        ("1.84", "1.845", False),
        ("1.84", "1.85", False),
        ("1.84", "1.8", False),
        ("1.33", "4/3", True),  # ASDiv: 80/60 hours written 1.33
        ("3.333", "10/3", True),  # ASDiv: 10/3 minutes written 3.333
        ("158.35", "158.51", False),
        # rule 4: a long decimal gold that rounds a simple fraction is that fraction too (MAWPS)
        ("0.6666666667", "2/3", True),
        ("0.6666666667", "0.6667", True),
        ("0.6666666667", "0.667", False),
        ("0.6666666667", "0.67", False),
        ("10.6666666667", "32/3", True),
        ("3.33333", "3.3333", True),
        ("0.6666666666666666", "0.6667", True),  # Calc-mawps result_float for 2/3
        # rule 5: a percent sign is a unit; the percent number is the answer
        ("60", "60%", True),
        ("60", "0.6", False),
        ("0.25", "25%", False),
    ],
)
def test_decimal_fraction_and_percent_rules(gold, said, correct):
    assert grade(_numeric(gold), f"The answer is {said}").correct is correct


def test_canonical_numbers_are_exact_where_a_decimal_ends():
    assert extract_answer("The answer is 69999.99", "numeric") == "69999.99"
    assert extract_answer("The answer is 1234567890.5", "numeric") == "1234567890.5"
    assert extract_answer("The answer is 100000000000/3", "numeric") == "33333333333.3"  # never an integer
    assert grading.numeric_equal("12", "12.0") and not grading.numeric_equal("12", "12.5")


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


REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path | None:
    """The benchmark files: ``$IMM_RAY_SHARED_DATA``, else ``<repo>/../shared/data`` (CI's fresh clone has
    shared/ beside the checkout), else ``<repo>/shared/data``."""
    override = os.environ.get("IMM_RAY_SHARED_DATA")
    candidates = [Path(override)] if override else [REPO.parent / "shared" / "data", REPO / "shared" / "data"]
    return next((c for c in candidates if (c / "gsm8k" / "test.jsonl").is_file()), None)


SHARED = _shared_data()


@pytest.fixture(scope="session")
def shared() -> Path:
    """The shared data folder; missing, the test fails under CI (``CI=true``) and is skipped elsewhere."""
    if SHARED is not None:
        return SHARED
    where = os.environ.get("IMM_RAY_SHARED_DATA") or f"{REPO.parent / 'shared' / 'data'} or {REPO / 'shared' / 'data'}"
    message = f"shared/data not found at {where} (set IMM_RAY_SHARED_DATA)"
    if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
        pytest.fail(f"{message}; CI must run the real-data tests")
    pytest.skip(message)


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


@pytest.mark.parametrize("name", list(REGISTRY))
def test_reference_answers_grade_correct(name, shared):
    problems = load_set(name, path=shared / name / "test.jsonl")
    correct = sum(grade(p, _model_style(p, answer_text(p))).correct for p in problems)
    assert correct / len(problems) >= REFERENCE_MIN[name], f"{name}: {correct}/{len(problems)}"


@pytest.mark.parametrize("name", list(REGISTRY))
def test_wrong_answers_grade_wrong(name, shared):
    problems = load_set(name, path=shared / name / "test.jsonl")
    picked = range(0, len(problems), WRONG_STRIDE.get(name, 1))
    wrong = sum(not grade(problems[i], _wrong_style(problems[i], _wrong_answer(problems, i))).correct for i in picked)
    assert wrong / len(picked) >= WRONG_MIN, f"{name}: {wrong}/{len(picked)}"


def test_other_shared_files_grade_too(shared):
    for name, file in (("sat_math", "agieval_sat-math.jsonl"), ("math", "test500_math_oai.jsonl")):
        problems = load_set(name, path=shared / name / file)
        correct = sum(grade(p, _model_style(p, answer_text(p))).correct for p in problems)
        assert correct / len(problems) >= 0.995, f"{file}: {correct}/{len(problems)}"


# ----------------------------------------------------------------------------------------------------------------
# Real numeric sets: the reference as models write it grades right, reference +-1 and x1.001 grade wrong, all
# ----------------------------------------------------------------------------------------------------------------

NUMERIC_SETS = [name for name, spec in REGISTRY.items() if spec.kind == "numeric"]


def _gold_number(problem: Problem) -> grading.Fraction | None:
    reading = grading._reading(problem.answer)
    return reading.value if isinstance(reading, grading._Number) else None


def _model_writes(value: grading.Fraction, as_written: str | None = None) -> list[str]:
    """A value in the forms models write it: "The answer is 1,234.", "The answer is $1234", "#### 1234"."""
    if as_written is not None and "/" in as_written:  # a fraction gold, as the record writes it ("-(1/3)")
        plain = grouped = as_written
    elif grading._decimal_places(value) is None:  # a non-terminating wrong value: as a fraction
        plain = grouped = f"{value.numerator}/{value.denominator}"
    else:
        plain = grading.format_number(value)
        whole, _, decimals = plain.lstrip("-").partition(".")
        grouped = ("-" if value < 0 else "") + f"{int(whole):,}" + (f".{decimals}" if decimals else "")
    return [f"The answer is {grouped}.", f"The answer is ${plain}", f"#### {plain}"]


def _wrong_values(gold: grading.Fraction) -> list[grading.Fraction]:
    """gold + 1; gold - 1 for an integer; gold x 1.001 where that moves it by a unit of its last place or more."""
    wrong = [gold + 1]
    places = grading._decimal_places(gold)
    if gold.denominator == 1:
        wrong.append(gold - 1)
    moves_a_unit = places is not None and abs(gold) / 1000 >= grading.Fraction(1, 10**places)
    if gold != 0 and (gold.denominator == 1 or moves_a_unit):
        wrong.append(gold * grading.Fraction(1001, 1000))
    return wrong


@pytest.mark.parametrize("name", NUMERIC_SETS)
def test_reference_as_models_write_it_grades_correct_for_every_record(name, shared):
    problems = load_set(name, path=shared / name / "test.jsonl")
    failed = []
    for problem in problems:
        gold = _gold_number(problem)
        forms = _model_writes(gold, problem.answer) if gold is not None else [
            f"The answer is {problem.answer}.", f"#### {problem.answer}"  # a time, ratio or text gold
        ]
        failed += [(problem.id, form) for form in forms if not grade(problem, form).correct]
    assert not failed, f"{name}: {len(failed)} renderings graded wrong, e.g. {failed[:5]}"


@pytest.mark.parametrize("name", NUMERIC_SETS)
def test_reference_off_by_one_or_scaled_grades_wrong_for_every_record(name, shared):
    problems = load_set(name, path=shared / name / "test.jsonl")
    checked, accepted = 0, []
    for problem in problems:
        gold = _gold_number(problem)
        if gold is None:
            continue
        for value in _wrong_values(gold):
            for form in _model_writes(value):
                checked += 1
                if grade(problem, form).correct:
                    accepted.append((problem.id, problem.answer, form))
    assert checked > 3 * len(problems)
    assert not accepted, f"{name}: {len(accepted)} of {checked} wrong answers graded right, e.g. {accepted[:5]}"

