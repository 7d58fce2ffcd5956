"""Few-shot prompts: the zero-shot format is frozen, the paper's exemplars are verbatim, draws come from train."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from imm_ray.data import prompts
from imm_ray.data.prompts import (
    GSM8K_PAPER_EXEMPLARS,
    MATH_PAPER_EXEMPLARS,
    RESPONSE_PREFIX,
    build_prompt,
    make_prompter,
    reference_response,
)
from imm_ray.data.records import Problem
from imm_ray.data.registry import DataError, load_set
from imm_ray.grading import grade

FIXTURES = Path(__file__).resolve().parent / "fixtures"
DATA_DIR = FIXTURES / "data_dir"


def _prompts_md() -> Path | None:
    override = os.environ.get("IMM_RAY_SHARED_DATA")
    candidates = [Path(override).parent / "PROMPTS.md"] if override else []
    candidates += [ancestor / "shared" / "PROMPTS.md" for ancestor in Path(__file__).resolve().parents]
    return next((c for c in candidates if c.is_file()), None)


def _problem(question: str = "Tom has 3 apples and buys 2 more. How many apples does he have?") -> Problem:
    return Problem(id="x/test/0", set_name="gsm8k", question=question, answer="5", kind="numeric")


def test_zero_shot_prompt_text_is_frozen():
    # The embedded toy model is pretrained on exactly this text; any change breaks it.
    assert build_prompt("  What is 2+2? \n") == (
        "Below is an instruction that describes a task.\n"
        "Write a response that appropriately completes the request like given examples below:\n\n"
        "Instruction:\nWhat is 2+2?\n\nResponse: Let's think step by step.\n"
    )


def test_zero_shot_prompter_is_build_prompt():
    problem = _problem()
    for name in ("gsm8k", "math", "mmlu_stem", "svamp"):
        assert make_prompter(name, num_shots=0, seed=1)(problem) == build_prompt(problem.question)


def test_paper_exemplars_are_verbatim():
    path = _prompts_md()
    if path is None:
        pytest.skip("shared/PROMPTS.md not found (set IMM_RAY_SHARED_DATA to <shared>/data)")
    text = " ".join(path.read_text(encoding="utf-8").split())
    for exemplar in (*GSM8K_PAPER_EXEMPLARS, *MATH_PAPER_EXEMPLARS):
        assert f"Question: {' '.join(exemplar.question.split())} A: Let's think step by step." in text
        assert f"{' '.join(exemplar.steps.split())} The answer is {exemplar.answer}" in text
    assert [e.answer for e in GSM8K_PAPER_EXEMPLARS] == ["4", "201", "140"]
    assert MATH_PAPER_EXEMPLARS[1].answer == "63π"


def test_ten_shot_gsm8k_prompt_paper_exemplars_first_then_train_draws():
    prompt = make_prompter("gsm8k", num_shots=10, seed=0, data_dir=DATA_DIR)(_problem())
    questions = re.findall(r"^Question: (.*)$", prompt, flags=re.MULTILINE)
    assert len(questions) == 10
    assert questions[:3] == [e.question for e in GSM8K_PAPER_EXEMPLARS]
    train = {p.question: p for p in load_set("gsm8k", "train", data_dir=DATA_DIR)}
    test = {p.question for p in load_set("gsm8k", "test", data_dir=DATA_DIR)}
    assert all(q in train and q not in test for q in questions[3:])
    # Drawn GSM8K solutions lose their calculator annotations and end with the answer line.
    assert "<<" not in prompt and "####" not in prompt
    drawn = train[questions[3]]
    assert f"{drawn.solution}\nThe answer is {drawn.answer}\n\nQuestion:" in prompt
    assert prompt.endswith(build_prompt(_problem().question)[len(prompts.HEADER):])


def test_draws_are_fixed_by_the_seed():
    def drawn(seed: int) -> list[str]:
        prompt = make_prompter("gsm8k", num_shots=6, seed=seed, data_dir=DATA_DIR)(_problem())
        return re.findall(r"^Question: (.*)$", prompt, flags=re.MULTILINE)[3:]

    assert drawn(1) == drawn(1)
    assert drawn(1) != drawn(2)


def test_asked_question_never_appears_as_its_own_exemplar():
    prompter = make_prompter("gsm8k", num_shots=10, seed=0, data_dir=DATA_DIR)
    for problem in load_set("gsm8k", "train", data_dir=DATA_DIR):
        prompt = prompter(problem)
        assert prompt.count(problem.question) == 1
        assert len(re.findall(r"^Question: ", prompt, flags=re.MULTILINE)) == 10


def test_math_exemplars_end_with_boxed_answer_and_skip_figures():
    prompt = make_prompter("math", num_shots=8, seed=0, data_dir=DATA_DIR)(_problem())
    blocks = prompt.split("Question: ")[1:]
    assert len(blocks) == 8
    assert blocks[0].startswith(MATH_PAPER_EXEMPLARS[0].question)
    for block in blocks[3:]:
        assert re.search(r"The answer is \$\\boxed\{.+\}\$\n\n", block)
    assert "[asy]" not in prompt  # the fixture's figure solution is not used


def test_numeric_ood_sets_use_gsm8k_exemplars():
    svamp = make_prompter("svamp", num_shots=4, seed=0, data_dir=DATA_DIR)(_problem())
    gsm8k = make_prompter("gsm8k", num_shots=4, seed=0, data_dir=DATA_DIR)(_problem())
    assert svamp == gsm8k


def test_choice_sets_get_multiple_choice_exemplars_answered_by_letter():
    problem = load_set("mmlu_stem", path=FIXTURES / "mmlu_stem.jsonl")[0]
    prompt = make_prompter("mmlu_stem", num_shots=3, seed=0)(problem)
    exemplars = prompt.split("Instruction:\n")[0].split("Question: ")[1:]
    assert len(exemplars) == 3
    for exemplar, original in zip(exemplars, GSM8K_PAPER_EXEMPLARS, strict=True):
        options = re.search(r"Answer Choices: \(A\) (.*) \(B\) (.*) \(C\) (.*) \(D\) (.*)\n", exemplar).groups()
        letter = re.search(r"The answer is ([A-D])\n", exemplar).group(1)
        assert options["ABCD".index(letter)] == original.answer
        assert len(set(options)) == 4
    assert "Answer Choices: (A) maintain the population" in prompt.split("Instruction:\n")[1]


def test_missing_train_split_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="exemplars are drawn from the gsm8k train split.*looked for"):
        make_prompter("gsm8k", num_shots=10, seed=0, data_dir=tmp_path)
    # Up to the three printed exemplars need no train split at all.
    prompt = make_prompter("gsm8k", num_shots=3, seed=0, data_dir=tmp_path)(_problem())
    assert prompt.count("Question: ") == 3


def test_unknown_set_and_negative_shots():
    with pytest.raises(DataError, match="known sets"):
        make_prompter("nope", num_shots=2, seed=0)
    with pytest.raises(ValueError, match="num_shots"):
        make_prompter("gsm8k", num_shots=-1, seed=0)


def test_chat_template_wraps_the_same_content():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    problem = _problem()
    plain = make_prompter("gsm8k", num_shots=2, seed=0)(problem)
    chat = make_prompter("gsm8k", num_shots=2, seed=0, chat_template_tokenizer=tokenizer)(problem)
    user = plain[: -len(RESPONSE_PREFIX)].strip()
    assert chat == f"<|user|>\n{user}<|end|>\n<|assistant|>\n{RESPONSE_PREFIX}"


def test_reference_response_formats():
    gsm8k = load_set("gsm8k", data_dir=DATA_DIR)[0]
    assert reference_response(gsm8k) == f"{gsm8k.solution}\nThe answer is 18"
    math = load_set("math", path=FIXTURES / "math.jsonl")[1]
    assert reference_response(math).endswith(r"$x=\boxed{\frac{7}{2}}$." "\n" r"The answer is $\boxed{\frac{7}{2}}$")
    assert reference_response(load_set("mawps", path=FIXTURES / "mawps.jsonl")[0]) is None
    mathqa = load_set("mathqa", path=FIXTURES / "mathqa.jsonl")[0]
    assert reference_response(mathqa).endswith("\nThe answer is A")
    # Runs of blank lines would hit the "\n\n\n" stop string; they are collapsed.
    spaced = math.model_copy(update={"solution": "Step one.\n\n\n\nSo $\\boxed{3}$.", "answer": "3"})
    assert reference_response(spaced) == "Step one.\n\nSo $\\boxed{3}$.\nThe answer is $\\boxed{3}$"


def test_reference_response_grades_correct_and_keeps_a_single_answer_line():
    toy = pytest.importorskip("imm_ray.data.toy", reason="imm_ray/data/toy.py (another issue) is not there yet")
    problem = toy.load_toy(toy.TOY_SETS[0], "train", 1, 0)[0]
    response = reference_response(problem)
    assert response.count("The answer is") == 1 and grade(problem, response).correct
