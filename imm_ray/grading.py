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

from imm_ray.data.prompts import STOP_STRINGS
from imm_ray.data.records import AnswerKind, Problem

logger = logging.getLogger(__name__)

LATEX_TIMEOUT_S = 5.0  # per comparison, as math-verify's own default
LATEX_STARTUP_TIMEOUT_S = 120.0  # importing sympy on a loaded 2-core machine can take many seconds
NUMERIC_REL_TOL = 1e-4  # as the common math-evaluation harnesses: "0.6666666667" == 2/3, "0.67" != 2/3
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
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*(\{|\s+)")


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


def boxed_contents(text: str) -> list[str]:
    """Every ``\\boxed{...}`` / ``\\fbox{...}`` content in order, braces balanced (``\\boxed 5`` too)."""
    found: list[str] = []
    for match in _BOXED.finditer(text):
        if match.group(1) == "{":
            inner = _balanced(text, match.end())
        else:
            token = re.match(r"[^\s$.,]+", text[match.end() :])
            inner = token.group(0) if token else None
        if inner is not None:
            found.append(inner)
    return found


def _balanced(text: str, start: int) -> str | None:
    """Text from ``start`` (just after ``{``) to the matching ``}``; None if the braces never close."""
    depth = 1
    for position in range(start, len(text)):
        char = text[position]
        escaped = text[position - 1] == "\\"
        if char == "{" and not escaped:
            depth += 1
        elif char == "}" and not escaped:
            depth -= 1
            if depth == 0:
                return text[start:position]
    return None


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


def format_number(value: Fraction) -> str:
    """The canonical text of a number: integers exactly, others to 10 significant digits."""
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.10g}"


def _numeric_from(text: str) -> str | None:
    """The canonical numeric answer in a statement: a time/ratio, else the first number (after a last "=")."""
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
        value /= denominator
    return format_number(value)


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


def numeric_equal(predicted: str, gold: str) -> bool:
    """Canonical numeric answers equal: numbers within :data:`NUMERIC_REL_TOL`, anything else as text."""
    a, b = _as_number(predicted), _as_number(gold)
    if a is not None and b is not None:
        return math.isclose(float(a), float(b), rel_tol=NUMERIC_REL_TOL, abs_tol=1e-9)
    return predicted == gold


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
    if numeric_equal(extracted, wanted):
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
