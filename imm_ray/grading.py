"""Answer extraction and one grader per answer kind (numeric, LaTeX, multiple choice).

The same functions serve the self-improvement filter (keep a sample iff it is correct) and evaluation.

Which part of a completion is "the answer". A completion is what the model wrote after the prompt; engines
may not stop where they should, so it can run on into a new made-up "Question: ..." block or keep writing
after its answer line. The rules, in order:

1. Only the first response block counts: the text is cut at the first stop string (``prompts.STOP_STRINGS``),
   exactly where generation would have stopped.
2. The answer is the FIRST answer line: a line that starts with "The answer is", "The final answer is",
   "Answer:" or "####" (case-insensitive). It is the statement the prompt format asks for; whatever follows it
   (a second answer line, a hallucinated next problem) was written after the model committed to an answer.
   Phrases like "so the answer is 5" inside a step line are reasoning, not the answer line: MATH solutions
   contain them ~500 times, sometimes with a different expression than the final answer.
3. Without an answer line: the last ``\\boxed{...}`` (MATH's own convention), then the last inline
   "answer is X" phrase.
4. Only where asked (``last_number_fallback=True``): the last number in the block (numeric) or the last
   parenthesised letter (choice), for models that never learned the answer line.

Numeric answers (:func:`numeric_equal`). Both sides are read as exact rationals: "1,234", "$1,234.00" and
"1234" are 1234; "3/4", "\\frac{3}{4}" and "0.75" are 3/4; "-(1/3)" (ASDiv's spelling) is -1/3. "%" is a unit
sign and is dropped ("25%" is 25). How close a prediction must be is decided by how the GOLD is written:

1. Integer gold (every GSM8K and SVAMP gold, 87% of MAWPS, 91% of ASDiv): exact equality. For 70000, "70000",
   "70,000", "70000.0", "$70,000" are right; "70001", "69999.99", "70000.01" are wrong. Integer golds are exact
   counts and amounts; the relative tolerance used before (1e-4, as the common harnesses) accepted gold+1 for
   every gold of 10,000 and more, 3.6% of GSM8K's test records.
2. Fraction gold, written a/b (ASDiv's "3/7", "25/3", "-(1/3)"): exact value. Right are an equal value ("6/14")
   or a decimal that IS the fraction correctly rounded at the decimal's own number of places, with at least
   :data:`ROUNDED_MIN_DIGITS` (4) significant digits: "0.4286" and "0.428571" for 3/7, "0.6667" for 2/3; not
   "0.43", "0.429" or "0.4285". A model has to cut a non-terminating value somewhere; 4 digits is the precision
   the 1e-4 harnesses asked for, and fewer stop telling neighbouring answers apart (0.67 is also 67/100).
3. Decimal gold with d places (MAWPS "1.84", "0.625", ASDiv "83.2", "1.33"): the prediction rounded to d
   places (halves away from zero) must equal the gold. For 1.84: "1.84", "1.840", "46/25", "1.8449" right;
   "1.85", "1.8", "1.845" wrong. The harness files store computed results as rounded floats (ASDiv "1.33" and
   "3.333" for 4/3 and 10/3, MAWPS "3.33333"), so a decimal gold is known to its d places and no finer:
   grading at that precision accepts the exact 4/3 against "1.33" and still rejects a change of one unit in
   the last place. The price: where a decimal gold happens to be exact, a longer prediction that rounds to it
   is accepted too ("0.54" for 0.5).
4. A decimal gold of 6 or more significant digits that lies within one unit of its last place of a
   non-terminating fraction with denominator <= 100 is ALSO that fraction under rule 2: the shared MAWPS file
   writes 2/3 as "0.6666666667" (59 such golds, all thirds, sixths, ninths, twelfths), Calc-mawps on the hub
   as the float 0.6666666666666666; "2/3" and "0.6667" answer both, "0.67" still does not.
5. Percentages: "25%" is 25, never 0.25. The golds of percentage questions are written as the percent number
   (GSM8K "What percentage of the entire students enrolled in hip-hop dance?" has "#### 60"; SVAMP and MAWPS
   ask for none; ASDiv's five % questions ask for amounts), so "60%" and "60" answer 60 and "0.6" does not.
6. Times and ratios ("3:30 p.m.", "5:6") compare in canonical form ("3:30pm", "5:6"); text golds ("Mrs. Hilt")
   by their normalised words.

The canonical text of a number (what :func:`extract_answer` reports) is exact for integers and terminating
decimals ("69999.99" never becomes 70000) and 10 significant digits for a non-terminating value.

LaTeX answers are compared with math-verify (``math_verify.parse`` / ``math_verify.verify``). Its own time
limit uses SIGALRM, which only works in a process's main thread, and Ray runs tasks in worker threads; so its
signal timeouts are disabled and every comparison runs in a child process (``python -m imm_ray.grading``) that
is killed and restarted when a comparison exceeds :data:`LATEX_TIMEOUT_S` (a killed comparison grades wrong).
A process and not a thread because a Python thread cannot be stopped: a runaway sympy simplification would
keep a core busy for the rest of the run. Identical answers (after light normalisation) skip the child.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from imm_ray.data.format import STOP_STRINGS, boxed_contents
from imm_ray.data.records import AnswerKind, Problem

logger = logging.getLogger(__name__)

LATEX_TIMEOUT_S = 5.0  # per comparison, as math-verify's own default
LATEX_STARTUP_TIMEOUT_S = 120.0  # importing sympy on a loaded 2-core machine can take many seconds
ROUNDED_MIN_DIGITS = 4  # rule 2: a rounded decimal for an exact non-integer gold needs 4 significant digits
ROUNDED_GOLD_MIN_DIGITS = 6  # rule 4: a decimal gold this long may be the rounding of a fraction ...
ROUNDED_GOLD_MAX_DENOMINATOR = 100  # ... with a denominator up to this
NONTERMINATING_DIGITS = 10  # significant digits of a canonical non-terminating value (2/3 -> 0.6666666667)
MAX_EXACT_PLACES = 30  # terminating decimals up to this many places are written exactly
CHOICE_LETTERS = "ABCDEFGHIJ"
DEFAULT_CHOICE_COUNT = 5  # without the options, accept A-E (MathQA has five)


@dataclass(frozen=True)
class Grade:
    """The answer found in a completion (None if none) and whether it matches the gold answer."""

    extracted: str | None
    correct: bool


# ----------------------------------------------------------------------------------------------------------------
# Locating the answer statement
# ----------------------------------------------------------------------------------------------------------------

# An answer line (rule 2 of the module docstring); public so data preparation can find such lines too.
ANSWER_LINE = re.compile(
    r"^[ \t*_>]*(?:(?:the\s+)?(?:final\s+)?answer\s*(?:is\b\s*:?|:)|####)[ \t*]*(?P<rest>.*)$",
    re.IGNORECASE | re.MULTILINE,
)
_INLINE_ANSWER = re.compile(r"\banswer\s*(?:is\b\s*:?|:)[ \t*]*(?P<rest>[^\n]*)", re.IGNORECASE)


def response_block(completion: str) -> str:
    """The completion up to the first stop string, where generation should have stopped."""
    cut = min((i for i in (completion.find(stop) for stop in STOP_STRINGS) if i >= 0), default=len(completion))
    return completion[:cut]


def _line_content(text: str, match: re.Match[str]) -> str:
    """What an answer statement says: the rest of its line, or the next non-empty line ("The answer is:\\n5")."""
    rest = match.group("rest").strip()
    if rest:
        return rest
    following = text[match.end() :].lstrip("\n").split("\n", 1)[0]
    return following.strip()


def _answer_line(block: str) -> str | None:
    match = ANSWER_LINE.search(block)
    return _line_content(block, match) if match else None


def _inline_answer(block: str) -> str | None:
    matches = list(_INLINE_ANSWER.finditer(block))
    return _line_content(block, matches[-1]) if matches else None


def _last_boxed(text: str) -> str | None:
    boxes = boxed_contents(text)
    return boxes[-1] if boxes else None


def _statement(block: str) -> str | None:
    """Rules 2 and 3 of the module docstring: the answer line, else the last box, else an inline phrase."""
    line = _answer_line(block)
    if line is not None:
        return line
    boxed = _last_boxed(block)
    if boxed is not None:
        return f"\\boxed{{{boxed}}}"
    return _inline_answer(block)


# ----------------------------------------------------------------------------------------------------------------
# Numeric answers
# ----------------------------------------------------------------------------------------------------------------

_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
_TIME_OR_RATIO = re.compile(
    r"(?<![\w.])(\d{1,2})\s*:\s*(\d{1,2})(?:\s*:\s*(\d{2}))?(?:\s*([ap])\.?\s*m\b\.?)?", re.IGNORECASE
)
_NUMBER_OR_FRACTION = re.compile(rf"(?<![\w.])(?P<num>{_NUMBER})(?:\s*/\s*(?P<den>{_NUMBER}))?")


def _unwrap_latex(text: str) -> str:
    """Numeric LaTeX made plain: boxes, $, \\text{}, thin spaces, \\frac{a}{b} -> a/b, %, unicode minus."""
    boxes = boxed_contents(text)
    if boxes:
        text = boxes[0]
    text = re.sub(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"(\1)/(\2)", text)
    text = re.sub(r"\\[dt]?frac\s*(\d)(\d)", r"\1/\2", text)
    for token in ("\\$", "$", "\\!", "\\,", "\\;", "\\%", "%", "\\left", "\\right", "~"):
        text = text.replace(token, " " if token in ("\\,", "\\;", "~") else "")
    text = text.replace("\u2212", "-").replace("\u2013", "-")
    # "(3)/(4)" from \frac, "-(1/3)" as ASDiv writes it: the parentheses only group a single number.
    text = re.sub(r"\(\s*(-?[\d.,]+)\s*\)", r"\1", text)
    return re.sub(r"-\s*\(\s*([\d.,]+\s*/\s*[\d.,]+)\s*\)", r"-\1", text)


def _to_fraction(number: str) -> Fraction:
    return Fraction(number.replace(",", ""))


def _decimal_places(value: Fraction) -> int | None:
    """How many decimal places write ``value`` exactly (0 for an integer); None if its decimal never ends."""
    denominator, twos, fives = value.denominator, 0, 0
    while denominator % 2 == 0:
        denominator, twos = denominator // 2, twos + 1
    while denominator % 5 == 0:
        denominator, fives = denominator // 5, fives + 1
    return max(twos, fives) if denominator == 1 else None


def _round(value: Fraction, places: int) -> Fraction:
    """``value`` rounded to ``places`` decimal places, halves away from zero (as people round)."""
    scale = 10**places
    magnitude = math.floor(abs(value) * scale + Fraction(1, 2))
    return Fraction(magnitude if value >= 0 else -magnitude, scale)


def _fixed(value: Fraction, places: int) -> str:
    """A multiple of 10**-places in positional notation, trailing zeros dropped."""
    digits = str(abs(value.numerator * 10**places // value.denominator)).rjust(places + 1, "0")
    text = f"{digits[:-places]}.{digits[-places:]}".rstrip("0").rstrip(".") if places else digits
    return f"-{text}" if value < 0 else text


def _significant_digits(value: Fraction, places: int) -> int:
    """The significant digits of ``value`` written with ``places`` decimals: 0.6667 -> 4, 12.5 -> 3."""
    return len(str(abs(value.numerator * 10**places // value.denominator)).lstrip("0"))


def format_number(value: Fraction) -> str:
    """The canonical text of a number: exact where a decimal ends, else 10 significant digits.

    Integers and terminating decimals are written exactly ("69999.99" stays 69999.99, never 70000); a
    non-terminating value (2/3) is rounded to :data:`NONTERMINATING_DIGITS` significant digits, but always
    keeps one decimal at least, so it never reads as an integer.
    """
    places = _decimal_places(value)
    if places is not None and places <= MAX_EXACT_PLACES:
        return _fixed(value, places)
    magnitude = len(str(abs(value.numerator) // value.denominator)) - 1 if abs(value) >= 1 else 0
    if abs(value) < 1:
        while abs(value) * 10 ** (-magnitude) < 1:
            magnitude -= 1
    places = max(NONTERMINATING_DIGITS - 1 - magnitude, 1)
    return _fixed(_round(value, places), places)


@dataclass(frozen=True)
class _Number:
    """A number as written: its exact value, and whether it was written as a fraction ("3/7", "\\frac{3}{7}")."""

    value: Fraction
    fraction: bool = False


def _reading(text: str) -> _Number | str | None:
    """What a numeric statement says: a number, a canonical time/ratio ("3:30pm"), or None.

    A time or ratio wins when it comes first; otherwise the first number after a last "=" if one has digits
    ("The answer is 15 * 8 = 120").
    """
    plain = _unwrap_latex(text)
    if "=" in plain and re.search(r"\d", plain.rsplit("=", 1)[1]):
        plain = plain.rsplit("=", 1)[1]  # "The answer is 15 * 8 = 120"
    clock = _TIME_OR_RATIO.search(plain)
    number = _NUMBER_OR_FRACTION.search(plain)
    if clock and (number is None or clock.start() <= number.start()):
        parts = [str(int(part)) for part in clock.groups()[:3] if part is not None]
        return ":".join(parts) + (f"{clock.group(4).lower()}m" if clock.group(4) else "")
    if number is None:
        return None
    value = _to_fraction(number.group("num"))
    if number.group("den"):
        denominator = _to_fraction(number.group("den"))
        if denominator == 0:
            return None
        return _Number(value / denominator, fraction=True)
    return _Number(value)


def _numeric_from(text: str) -> str | None:
    """The canonical numeric answer in a statement: a time/ratio, else the first number (after a last "=")."""
    found = _reading(text)
    return format_number(found.value) if isinstance(found, _Number) else found


def _plain_text(text: str) -> str:
    """A text answer for comparison: lower case, no punctuation or LaTeX wrappers, single spaces."""
    text = _unwrap_latex(text).lower()
    text = re.sub(r"[^\w\s:/.-]|(?<!\d)\.|\.(?!\d)", " ", text)
    text = re.sub(r"^(?:the|a|an)\s+", "", " ".join(text.split()))
    return text


def canonical_numeric(text: str) -> str | None:
    """How a numeric-kind answer is compared and reported: a number, a time/ratio, or normalised text."""
    found = _numeric_from(text)
    if found is not None:
        return found
    plain = _plain_text(text)
    return plain or None


def _as_number(text: str) -> Fraction | None:
    try:
        return _to_fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def _is_rounding_of(said: Fraction, exact: Fraction) -> bool:
    """Rule 2's rounded form: ``said`` is ``exact`` rounded at its own decimals, with enough digits."""
    places = _decimal_places(said)
    if not places:  # an integer, or a value no decimal writes: only equality counts
        return False
    return _significant_digits(said, places) >= ROUNDED_MIN_DIGITS and _round(exact, places) == said


def _rounded_fraction(gold: Fraction, places: int) -> Fraction | None:
    """Rule 4: the fraction a long decimal gold is the rounding of (0.6666666667 -> 2/3), if it is one."""
    if _significant_digits(gold, places) < ROUNDED_GOLD_MIN_DIGITS:
        return None
    source = gold.limit_denominator(ROUNDED_GOLD_MAX_DENOMINATOR)
    # within one unit of the last place, not only the correct rounding: a float's shortest text cuts rather
    # than rounds (2/3 as float64 prints 0.6666666666666666, Calc-mawps' result_float)
    close = abs(source - gold) <= Fraction(1, 10**places)
    return source if _decimal_places(source) is None and close else None


def _number_matches(said: Fraction, gold: _Number) -> bool:
    """The rules of "Numeric answers" in the module docstring, ``said`` being the prediction's exact value."""
    if said == gold.value:
        return True
    places = _decimal_places(gold.value)
    if gold.fraction or places is None or places == 0:  # rules 1 and 2: an exact gold
        return _is_rounding_of(said, gold.value)
    if _round(said, places) == gold.value:  # rule 3: a decimal gold, at its own places
        return True
    source = _rounded_fraction(gold.value, places)  # rule 4
    return source is not None and _is_rounding_of(said, source)


def numeric_equal(predicted: str, gold: str) -> bool:
    """Whether a numeric-kind prediction matches the gold (rules in the module docstring, "Numeric answers").

    Both may be raw or canonical text; the gold is best given raw, so that a fraction gold ("3/7") is known
    to be exact. Times, ratios and text compare by their canonical form.
    """
    said, wanted = _reading(predicted), _reading(gold)
    if isinstance(said, _Number) and isinstance(wanted, _Number):
        return _number_matches(said.value, wanted)
    if isinstance(said, _Number) or isinstance(wanted, _Number):
        return False
    return canonical_numeric(predicted) == canonical_numeric(gold)


def _text_answer_matches(statement: str, gold: str) -> bool:
    """For ASDiv's text answers ("Mrs. Hilt", "They are equal"): the statement starts with the gold words."""
    said, wanted = _plain_text(statement), _plain_text(gold)
    return bool(wanted) and (said == wanted or re.match(rf"{re.escape(wanted)}\b", said) is not None)


# ----------------------------------------------------------------------------------------------------------------
# Multiple-choice answers
# ----------------------------------------------------------------------------------------------------------------


def _strip_choice_wrappers(text: str) -> str:
    boxes = boxed_contents(text)
    if boxes:
        text = boxes[0]
    text = re.sub(r"\\(?:text|textbf|mathrm)\s*\{([^{}]*)\}", r"\1", text)
    text = text.replace("$", "").replace("*", "").strip()
    return re.sub(r"^(?:option|choice)\s*", "", text, flags=re.IGNORECASE).strip()


def _letter_in(text: str, valid: str) -> str | None:
    """The option letter a statement names, in the forms models write: "(C)", "C", "c)", "C.", "option c"."""
    patterns = (
        r"^\(([A-Ja-j])\)",  # "(C) 12", "(c)"
        r"^([A-Ja-j])\s*\)",  # "C) 12", "c )"
        r"^([A-J])(?![\w'])",  # "C", "C.", "C: 12" (upper case only: a bare "a" is usually the article)
        r"^([a-j])\s*[.:]?\s*$",  # a lone "c" / "c."
        r"^['\"]\s*([A-Ja-j])\s*['\"]",  # "option ' d '" (MathQA rationales)
        r"\(([A-Ja-j])\)",  # "option (C) is right"
    )
    for pattern in patterns:
        match = re.search(pattern, text)
        if match and match.group(1).upper() in valid:
            return match.group(1).upper()
    return None


def _option_key(text: str) -> str:
    return re.sub(r"[\s$,]|\\[,!;]|\.$", "", _strip_choice_wrappers(text)).lower()


def _letter_by_value(text: str, choices: Sequence[str]) -> str | None:
    """The letter of the one option whose text, or whose number, the statement gives."""
    key = _option_key(text)
    same = [i for i, choice in enumerate(choices) if key and _option_key(choice) == key]
    if len(same) == 1:
        return CHOICE_LETTERS[same[0]]
    said = _numeric_from(text)
    if said is None or _as_number(said) is None:
        return None
    values = [_numeric_from(choice) for choice in choices]
    equal = [i for i, value in enumerate(values) if value is not None and numeric_equal(said, value)]
    return CHOICE_LETTERS[equal[0]] if len(equal) == 1 else None


def _choice_from(statement: str, choices: Sequence[str] | None) -> str | None:
    valid = CHOICE_LETTERS[: len(choices) if choices else DEFAULT_CHOICE_COUNT]
    text = _strip_choice_wrappers(statement)
    letter = _letter_in(text, valid)
    if letter is None and choices:
        letter = _letter_by_value(text, choices)
    return letter


# ----------------------------------------------------------------------------------------------------------------
# LaTeX answers
# ----------------------------------------------------------------------------------------------------------------


def _latex_from(statement: str) -> str | None:
    boxes = boxed_contents(statement)
    text = boxes[0] if boxes else statement
    text = text.strip().rstrip(".").strip()
    if text.startswith("$") and text.endswith("$"):
        text = text.strip("$").strip()
    elif text.startswith("\\(") and text.endswith("\\)"):
        text = text[2:-2].strip()
    return text or None


def latex_key(text: str) -> str:
    """A light normal form under which two LaTeX answers are certainly equal (the fast path)."""
    text = re.sub(r"\\(?:left|right|displaystyle|!|,|;|:)", "", text.replace("π", "\\pi"))
    text = re.sub(r"\s+|\\ ", "", text)
    text = re.sub(r"\\[dt]frac", r"\\frac", text)
    text = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", text)  # \frac34 == \frac{3}{4}
    text = re.sub(r"\^\{?\\circ\}?|\\%|\$", "", text)
    return text.rstrip(".")


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


def extract_answer(
    completion: str,
    kind: AnswerKind,
    *,
    last_number_fallback: bool = False,
    choices: Sequence[str] | None = None,
) -> str | None:
    """The answer a completion states, in canonical form for ``kind`` (None if it states none).

    numeric: a canonical number ("1000", "0.5"), a time or ratio ("3:30pm", "3:4") or normalised text;
    latex: the LaTeX of the answer (boxed content); choice: the uppercase letter, found from the letter or,
    given ``choices``, from the option's text or value.
    """
    block = response_block(completion)
    statement = _statement(block)
    if kind == "numeric":
        return _extract_numeric(block, statement, last_number_fallback)
    if kind == "latex":
        return _latex_from(statement) if statement is not None else None
    if kind == "choice":
        return _extract_choice(block, statement, choices, last_number_fallback)
    raise ValueError(f"unknown answer kind {kind!r}")


def _extract_numeric(block: str, statement: str | None, last_number_fallback: bool) -> str | None:
    found = canonical_numeric(statement) if statement is not None else None
    if found is None and last_number_fallback:
        numbers = list(_NUMBER_OR_FRACTION.finditer(_unwrap_latex(block)))
        found = canonical_numeric(numbers[-1].group(0)) if numbers else None
    return found


def _extract_choice(
    block: str, statement: str | None, choices: Sequence[str] | None, last_number_fallback: bool
) -> str | None:
    found = _choice_from(statement, choices) if statement is not None else None
    if found is None and len(block.strip()) <= 12:  # a bare "(C)" or "C." completion
        found = _choice_from(block, choices)
    if found is None and last_number_fallback:  # for choices, the last "(X)" written
        letters = re.findall(r"\(([A-J])\)", block)
        found = letters[-1] if letters else None
    return found


def grade(problem: Problem, completion: str, *, last_number_fallback: bool = False) -> Grade:
    """Grade one completion of ``problem`` with its kind's grader."""
    extracted = extract_answer(
        completion, problem.kind, last_number_fallback=last_number_fallback, choices=problem.choices
    )
    if extracted is None:
        return Grade(None, False)
    if problem.kind == "numeric":
        correct = _numeric_correct(extracted, completion, problem.answer)
    elif problem.kind == "latex":
        correct = latex_equal(problem.answer, extracted)
    else:
        correct = extracted == problem.answer.strip().upper()
    return Grade(extracted, correct)


def _numeric_correct(extracted: str, completion: str, gold: str) -> bool:
    wanted = canonical_numeric(gold)
    if wanted is None:
        return False
    if numeric_equal(extracted, gold):
        return True
    if _as_number(wanted) is None:  # a text gold: "Mrs. Hilt" also matches "Mrs. Hilt, who has 5 more"
        statement = _statement(response_block(completion))
        return statement is not None and _text_answer_matches(statement, gold)
    return False


def latex_equal(gold: str, predicted: str, *, timeout_s: float = LATEX_TIMEOUT_S) -> bool:
    """Whether two LaTeX answers are mathematically equal (math-verify, in the isolated child process)."""
    if latex_key(gold) == latex_key(predicted):
        return True
    return _verifier().equivalent(gold, predicted, timeout_s=timeout_s) is True


# ----------------------------------------------------------------------------------------------------------------
# math-verify in a child process
# ----------------------------------------------------------------------------------------------------------------


class LatexVerifier:
    """A child process running math-verify, one comparison at a time, killed when one takes too long.

    Thread-safe (a lock serialises requests; one child per verifier). The child is started on first use and
    after every timeout or crash; it exits by itself when this process closes its end of the pipe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[str] | None = None
        self._replies: queue.Queue[str | None] = queue.Queue()
        self._owner = os.getpid()

    def equivalent(self, gold: str, predicted: str, *, timeout_s: float = LATEX_TIMEOUT_S) -> bool | None:
        """math-verify's verdict, or None when it did not finish within ``timeout_s`` (or the child died)."""
        with self._lock:
            process = self._ensure_started()
            if process is None:
                return None
            assert process.stdin is not None
            try:
                process.stdin.write(json.dumps([gold, predicted]) + "\n")
                process.stdin.flush()
            except OSError:
                self._stop()
                return None
            reply = self._reply(timeout_s)
            if reply is None:
                logger.warning("math-verify: no verdict in %.1fs on %r vs %r; restarting", timeout_s, gold, predicted)
                self._stop()
                return None
            return reply == "1"

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _reply(self, timeout_s: float) -> str | None:
        try:
            return self._replies.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def _ensure_started(self) -> subprocess.Popen[str] | None:
        if self._owner != os.getpid():  # forked: the child belongs to the parent process
            self._process, self._replies, self._owner = None, queue.Queue(), os.getpid()
        if self._process is not None and self._process.poll() is None:
            return self._process
        self._process = self._spawn()
        if self._reply(LATEX_STARTUP_TIMEOUT_S) != "ready":
            logger.error("the math-verify child process did not start; LaTeX answers grade as wrong")
            self._stop()
            return None
        return self._process

    def _spawn(self) -> subprocess.Popen[str]:
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parent.parent)  # so the child imports this imm_ray
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        process = subprocess.Popen(
            [sys.executable, "-m", "imm_ray.grading"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            env=env,
        )
        self._replies = queue.Queue()
        threading.Thread(target=_pump, args=(process, self._replies), daemon=True).start()
        return process

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None


def _pump(process: subprocess.Popen[str], replies: queue.Queue[str | None]) -> None:
    """Forward the child's reply lines to ``replies``; a reader thread, so waiting can time out portably."""
    assert process.stdout is not None
    for line in process.stdout:
        replies.put(line.strip())
    replies.put(None)


_shared_verifier: LatexVerifier | None = None
_shared_lock = threading.Lock()


def _verifier() -> LatexVerifier:
    global _shared_verifier
    with _shared_lock:
        if _shared_verifier is None:
            _shared_verifier = LatexVerifier()
            atexit.register(_shared_verifier.close)
        return _shared_verifier


def _serve() -> None:
    """The child's loop: read ``[gold, predicted]`` JSON lines, answer "1" or "0" per line."""
    from functools import lru_cache

    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns that its timeout is off: we own it

    @lru_cache(maxsize=4096)
    def parsed(latex: str) -> list[object]:
        return parse(f"$\\boxed{{{latex.replace('π', chr(92) + 'pi')}}}$", parsing_timeout=None)

    print("ready", flush=True)
    for line in sys.stdin:
        gold, predicted = json.loads(line)
        try:
            same = verify(parsed(gold), parsed(predicted), timeout_seconds=None)
        except Exception:  # math-verify/sympy can raise on odd input; such a pair is not shown equal
            same = False
        print("1" if same else "0", flush=True)


if __name__ == "__main__":
    _serve()
