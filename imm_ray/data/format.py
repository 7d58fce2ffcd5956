"""The response and prompt format itself (../shared/PROMPTS.md, Appendix A.1): plain strings, nothing loaded.

The format sits below every module that reads or writes it (the toy world, the grader, the exemplar machinery in
:mod:`imm_ray.data.prompts`), so none of them needs the data registry to know what a prompt looks like.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

HEADER = (
    "Below is an instruction that describes a task.\n"
    "Write a response that appropriately completes the request like given examples below:\n\n"
)
RESPONSE_PREFIX = "Response: Let's think step by step.\n"
ANSWER_PREFIX = "The answer is "
# Generation stops at the start of a new block, as the paper's code did.
STOP_STRINGS = ("\nQuestion:", "\nInstruction", "\nResponse", "\n\n\n")


def format_exemplar(question: str, steps: str, answer: str) -> str:
    """One worked example: question, "A: Let's think step by step.", the steps, "The answer is X"."""
    return f"Question: {question}\nA: Let's think step by step.\n{steps.strip()}\n{ANSWER_PREFIX}{answer}\n\n"


def build_prompt(question: str, exemplars: Sequence[str] = ()) -> str:
    """The prompt for one question; ``exemplars`` are already formatted with :func:`format_exemplar`."""
    return f"{HEADER}{''.join(exemplars)}Instruction:\n{question.strip()}\n\n{RESPONSE_PREFIX}"


def format_response(steps: str, answer: str) -> str:
    """A target response for SFT / pretraining: the steps, then the answer line, then end of text."""
    return f"{steps.strip()}\n{ANSWER_PREFIX}{answer}"


# MATH-style answers: the final answer sits in \boxed{...} (the grader and the data registry both read it).
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*(\{|\s+)")


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
