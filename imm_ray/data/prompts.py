"""The paper's few-shot chain-of-thought prompt format (../shared/PROMPTS.md, Appendix A.1).

One format is used for generation, SFT data and evaluation: the SFT pairs are ``(build_prompt(q), response)``
and the loss falls on the response only.
"""

from __future__ import annotations

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
