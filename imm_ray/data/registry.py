"""The data-set registry: the paper's eight benchmarks and the toy sets, each loaded into :class:`Problem` records.

Every set has one frozen :class:`SetSpec` in :data:`REGISTRY`: its answer kind, its Hugging Face hub source and a
record parser from the source format (../shared/data/README.md) to :class:`Problem` fields. Parsers accept the
field names of both the local harness files and the hub mirrors named in the specs, so one parser covers both.

Where a set is read from, first match wins (:func:`load_set`):
1. an explicit ``path``: a local ``.jsonl`` / ``.json`` / ``.parquet`` file, or ``hf://owner/repo[/file]``;
2. ``<data_dir>/<name>/<split>.{jsonl,json,parquet}``, with ``data_dir`` from the argument or ``$IMM_RAY_DATA_DIR``;
3. the hub file of the spec, through ``huggingface_hub.hf_hub_download`` (no ``datasets`` package).
Toy sets (``imm_ray.data.toy``) are generated, never read from files.

Record ids are ``<set>/<split>/<index>`` (as the toy sets write them), ``index`` being the 0-based position of
the record in its source (blank JSONL lines skipped), so a predictions file can point back at its records.
"""

from __future__ import annotations

import ast
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imm_ray.data.records import AnswerKind, Problem
from imm_ray.data.format import boxed_contents

DATA_DIR_ENV = "IMM_RAY_DATA_DIR"
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
HUB_SCHEME = "hf://"


class DataError(ValueError):
    """A data set cannot be found, read or parsed; the message names the set, file, line and field."""


class MissingFieldError(KeyError):
    """Raised by a record parser; :func:`load_set` turns it into a :class:`DataError` naming file and line."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__(names)
        self.names = names

    def __str__(self) -> str:
        return " or ".join(repr(n) for n in self.names)


class BadFieldError(ValueError):
    """A record's field exists but its value cannot be understood (e.g. an option string without options)."""


@dataclass(frozen=True)
class ParsedRecord:
    """What a parser extracts from one source record; the loader adds id, set name and kind."""

    question: str
    answer: str
    choices: tuple[str, ...] | None = None
    solution: str | None = None


RecordParser = Callable[[Mapping[str, Any]], ParsedRecord]


@dataclass(frozen=True)
class SetSpec:
    """One benchmark: what its answers look like and where the hub keeps it.

    ``hub_files`` maps our split names to the file inside ``hub_repo`` (some sets only publish a test split, and
    ASDiv's only split is called ``validation`` on the hub); ``hub_revision`` is the branch or ref holding those
    files when it is not the default branch.
    """

    name: str
    kind: AnswerKind
    hub_repo: str
    hub_files: Mapping[str, str]
    parse: RecordParser = field(repr=False)
    description: str = ""
    hub_revision: str | None = None


# ----------------------------------------------------------------------------------------------------------------
# Field access and small text helpers shared by the parsers
# ----------------------------------------------------------------------------------------------------------------


def _field(row: Mapping[str, Any], *names: str) -> Any:
    """The first of ``names`` present (and not null) in ``row``; the alternatives cover hub mirrors' spellings."""
    for name in names:
        value = row.get(name)
        if value is not None:
            return value
    raise MissingFieldError(names)


def _text(row: Mapping[str, Any], *names: str) -> str:
    return str(_field(row, *names)).strip()


def _number_text(value: Any) -> str:
    """A gold number as text without float noise: 43.0 -> "43", "1,000" -> "1000", 0.5 -> "0.5"."""
    text = str(value).strip().replace(",", "")
    try:
        number = float(text)
    except ValueError:
        return text
    if number.is_integer() and abs(number) < 1e15:
        return str(int(number))
    return text


def format_choices(question: str, choices: tuple[str, ...]) -> str:
    """The question text a model sees for a multiple-choice set: the options follow as "(A) ... (B) ..."."""
    options = " ".join(f"({letter}) {text}" for letter, text in zip(_letters(len(choices)), choices, strict=True))
    return f"{question.strip()}\nAnswer Choices: {options}"


def _letters(n: int) -> str:
    return "ABCDEFGHIJ"[:n]


def _letter_of(value: Any, choices: tuple[str, ...]) -> str:
    """A gold choice given as a letter ("c", "(C)") or a 0-based index, as an uppercase letter in range."""
    if isinstance(value, list | tuple):  # AGIEval on the hub stores gold as a one-element list
        if len(value) != 1:
            raise BadFieldError(f"expected one gold choice, got {value!r}")
        value = value[0]
    text = str(value).strip().strip("()").strip()
    if re.fullmatch(r"\d+", text):
        index = int(text)
    elif re.fullmatch(r"[A-Za-z]", text):
        index = ord(text.upper()) - ord("A")
    else:
        raise BadFieldError(f"gold choice {value!r} is neither a letter nor an index")
    if not 0 <= index < len(choices):
        raise BadFieldError(f"gold choice {value!r} is out of range for {len(choices)} options")
    return _letters(len(choices))[index]


def _split_lettered(options: str, pattern: str, letters: str) -> tuple[str, ...]:
    """Split "A) x B) y ..." style option strings by finding each letter's marker in order.

    Searching for the next expected letter (A, then B, ...) rather than any letter keeps option texts that
    themselves contain "x )" or commas ("rs . 1 , 200") intact.
    """
    cuts: list[tuple[int, int]] = []
    position = 0
    for letter in letters:
        match = re.compile(pattern.format(letter=letter)).search(options, position)
        if match is None:
            break
        cuts.append((match.start(), match.end()))
        position = match.end()
    if len(cuts) < 2:
        raise BadFieldError(f"cannot split options {options[:80]!r} into lettered choices")
    ends = [start for start, _ in cuts[1:]] + [len(options)]
    texts = [options[begin:end].strip().rstrip(",").strip() for (_, begin), end in zip(cuts, ends, strict=True)]
    # Some MathQA records repeat the marker ("a ) a ) 1055 , b ) b ) 1215"); drop the repeat of the same letter.
    return tuple(
        re.sub(rf"^\(?{letter}\s*[).]\s*", "", text, flags=re.IGNORECASE)
        for letter, text in zip(letters, texts, strict=False)
    )


def _strip_option_letter(option: str) -> str:
    """ "(A)2" / "A) 2" / "A. 2" -> "2" (list formats); a repeated marker ("a ) a ) 4 inches") goes too."""
    return re.sub(r"^(?:\s*\(?[A-Ja-j]\s*[).:]\s*){1,2}", "", str(option)).strip()


# ----------------------------------------------------------------------------------------------------------------
# Record parsers, one per source format
# ----------------------------------------------------------------------------------------------------------------


def gsm8k_steps(answer_field: str) -> tuple[str, str]:
    """GSM8K's ``answer``: (steps without ``<<...>>`` calculator annotations, the final number after ``####``)."""
    if "####" not in answer_field:
        raise BadFieldError("GSM8K 'answer' has no '#### N' line")
    steps, final = answer_field.rsplit("####", 1)
    steps = re.sub(r"<<[^>]*>>", "", steps)
    return steps.strip(), _number_text(final)


def _parse_gsm8k(row: Mapping[str, Any]) -> ParsedRecord:
    steps, answer = gsm8k_steps(_text(row, "answer"))
    return ParsedRecord(question=_text(row, "question"), answer=answer, solution=steps)


def _parse_math(row: Mapping[str, Any]) -> ParsedRecord:
    solution = _text(row, "solution")
    # MATH-500 carries its own answer string; the full MATH files only have the boxed solution.
    answer = row.get("answer")
    boxes = boxed_contents(solution)
    gold = str(answer).strip() if answer is not None else (boxes[-1] if boxes else None)
    if gold is None:
        raise BadFieldError("MATH 'solution' has no \\boxed{...} answer")
    return ParsedRecord(question=_text(row, "problem", "question"), answer=gold, solution=solution)


def _parse_mawps(row: Mapping[str, Any]) -> ParsedRecord:
    return ParsedRecord(
        question=_text(row, "input", "question", "Question"),
        answer=_number_text(_field(row, "target", "result_float", "answer", "Answer")),
    )


def _parse_svamp(row: Mapping[str, Any]) -> ParsedRecord:
    body = _text(row, "Body", "body")
    question = _text(row, "Question", "question")
    # SVAMP bodies sometimes end without a full stop; join so the question stays a separate sentence.
    joined = f"{body} {question}" if body.endswith((".", "?", "!")) else f"{body}. {question}"
    return ParsedRecord(question=joined.strip(), answer=_number_text(_field(row, "Answer", "answer")))


def asdiv_answer(raw: str) -> str:
    """ASDiv's "9 (apples)" -> "9"; non-numeric answers ("Mrs. Hilt", "3:30 p.m.", "5:6") stay as written."""
    text = raw.strip()
    match = re.fullmatch(r"(-?[\d,]*\.?\d+)\s*\([^)]*\)", text)
    return _number_text(match.group(1)) if match else text


def _parse_asdiv(row: Mapping[str, Any]) -> ParsedRecord:
    body = _text(row, "body", "Body")
    question = _text(row, "question", "Question")
    return ParsedRecord(question=f"{body} {question}".strip(), answer=asdiv_answer(_text(row, "answer", "Answer")))


def _sat_choices(row: Mapping[str, Any]) -> tuple[str, ...]:
    options = _field(row, "options", "choices")
    if isinstance(options, str):  # harness format: "A) $f(-6)=0$ B) $f(6)=-6$ ..."
        return _split_lettered(options, r"(?:^|\s)\(?{letter}[).]\s*", "ABCDEFGHIJ")
    return tuple(_strip_option_letter(option) for option in options)  # AGIEval list: ["(A)2", "(B)4", ...]


def _sat_question(row: Mapping[str, Any]) -> str:
    if "query" in row and "question" not in row:
        # AGIEval on the hub ships a ready prompt "Q: ... Answer Choices: ... A: Among A through D, the answer is".
        query = str(row["query"])
        query = re.sub(r"^\s*Q:\s*", "", query)
        return re.split(r"\s*Answer Choices:", query, maxsplit=1)[0].strip()
    passage = str(row.get("passage") or "").strip()
    question = _text(row, "question")
    return f"{passage}\n{question}" if passage else question


def _parse_sat_math(row: Mapping[str, Any]) -> ParsedRecord:
    choices = _sat_choices(row)
    other = row.get("other")
    solution = other.get("solution") if isinstance(other, Mapping) else None
    return ParsedRecord(
        question=format_choices(_sat_question(row), choices),
        answer=_letter_of(_field(row, "Answer", "label", "gold"), choices),
        choices=choices,
        solution=str(solution).strip() if solution else None,
    )


def _mathqa_choices(row: Mapping[str, Any]) -> tuple[str, ...]:
    options = _field(row, "options")
    if isinstance(options, str) and options.lstrip().startswith("["):
        # a few MathQA records store the options as a Python list literal: "['a ) 462 cm ²', 'b ) 530 cm ²', ...]"
        try:
            options = ast.literal_eval(options)
        except (ValueError, SyntaxError):
            raise BadFieldError(f"'options' {options[:80]!r} looks like a list but does not parse") from None
    if isinstance(options, str):  # the usual "a ) 12 , b ) 16 , c ) 18 , d ) 24 , e ) 26"
        return _split_lettered(options, r"(?:^|,)\s*{letter}\s*\)\s*", "abcdefghij")
    return tuple(_strip_option_letter(option) for option in options)


def _parse_mathqa(row: Mapping[str, Any]) -> ParsedRecord:
    choices = _mathqa_choices(row)
    rationale = row.get("rationale", row.get("Rationale"))
    return ParsedRecord(
        question=format_choices(_text(row, "problem", "Problem"), choices),
        answer=_letter_of(_field(row, "correct"), choices),
        choices=choices,
        solution=str(rationale).strip().strip('"').strip() if rationale else None,
    )


def _parse_mmlu_stem(row: Mapping[str, Any]) -> ParsedRecord:
    choices = tuple(str(choice).strip() for choice in _field(row, "choices"))
    return ParsedRecord(
        question=format_choices(_text(row, "question"), choices),
        answer=_letter_of(_field(row, "answer"), choices),
        choices=choices,
    )


# ----------------------------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------------------------


def _parquet_split(prefix: str, *splits: str) -> dict[str, str]:
    return {split: f"{prefix}{split}-00000-of-00001.parquet" for split in splits}


# Hub sources. The hub cannot be reached from the machine this was written on; every entry below was checked
# against stored copies of the hub's own pages (file trees, dataset cards, commits) and against public code that
# loads the repo, as noted per set. "Confirmed" means seen in such a source; anything else is said to be open.
# Any entry can be replaced per call with ``path="hf://owner/repo/file"`` or a local file (see load_set).
REGISTRY: Mapping[str, SetSpec] = {
    spec.name: spec
    for spec in (
        # openai/gsm8k. Confirmed: config "main" with data_files main/train-*, main/test-* and features question,
        # answer (string) in the card (hub commits 2c868b8 "Convert dataset to Parquet" and 60b4b82,
        # https://huggingface.co/datasets/openai/gsm8k/commit/60b4b82b84c2dac2b54f7d7f3056eae01514f12e); the exact
        # names main/test-00000-of-00001.parquet and main/train-00000-of-00001.parquet in several public scripts
        # that download https://huggingface.co/datasets/openai/gsm8k/resolve/main/main/test-00000-of-00001.parquet.
        # 7,473 / 1,319 rows (card), as the shared files.
        SetSpec("gsm8k", "numeric", "openai/gsm8k", _parquet_split("main/", "train", "test"), _parse_gsm8k,
                "grade-school word problems; '#### N' answers"),
        # DigitalLearningGmbH/MATH-lighteval. Confirmed: public code loads it with config "default", splits train
        # and test (5,000 test rows), columns problem, solution, level, type, and lists its files under "data/"
        # (revision 0530c78699ea5e8eb5530600900e1f328b48acad). NOT confirmed: the exact file names
        # data/{train,test}-00000-of-00001.parquet (no stored file listing of this repo; they are the names its
        # copy MaziyarPanahi/MATH-lighteval uses, https://huggingface.co/datasets/MaziyarPanahi/MATH-lighteval/tree/
        # 4d50b8c0d14913547f95b2e9d81028e77aef4e34/data), nor the column types (taken as strings, as every MATH copy).
        SetSpec("math", "latex", "DigitalLearningGmbH/MATH-lighteval", _parquet_split("data/", "train", "test"),
                _parse_math, "competition mathematics; \\boxed{} answers"),
        # MU-NLPC/Calc-mawps. Confirmed: original-splits/test-00000-of-00001-4f420cd8985debf1.parquet in the file
        # tree (https://huggingface.co/datasets/MU-NLPC/Calc-mawps/tree/main/original-splits) and the card's
        # features id, question, chain, result (string), result_float (float64), equation, expression; test has
        # 520 rows (the shared harness file has 2,065: a different MAWPS selection). The parser reads question
        # and result_float. NOT confirmed: how ``result`` writes fractions, so it is not used.
        SetSpec("mawps", "numeric", "MU-NLPC/Calc-mawps",
                {"test": "original-splits/test-00000-of-00001-4f420cd8985debf1.parquet"}, _parse_mawps,
                "arithmetic word problems; numeric target"),
        # ChilleD/SVAMP. Confirmed: data/train-00000-of-00001.parquet and data/test-00000-of-00001.parquet in the
        # file tree (https://huggingface.co/datasets/ChilleD/SVAMP/tree/main/data, commit 5e0bf1e); columns
        # Body, Question, Equation, Answer, Type, ID in public loaders. Its splits are a 700/300 re-split of the
        # 1,000 problems ("seed 42, train set ratio 0.7" in its history; 300 test rows in a pinned loader), so its
        # "test" is NOT the 1,000-problem SVAMP test of the paper and the shared file. NOT confirmed: the Answer
        # type in this repo (float64 in copies of the same table, e.g. tongyx361/svamp's card).
        SetSpec("svamp", "numeric", "ChilleD/SVAMP", _parquet_split("data/", "train", "test"), _parse_svamp,
                "varied arithmetic word problems; numeric Answer"),
        # EleutherAI/asdiv. Confirmed: asdiv/validation-00000-of-00001.parquet with features body, question,
        # solution_type, answer, formula (strings), 2,305 rows, config "asdiv", in the hub's parquet conversion
        # PR (https://huggingface.co/datasets/EleutherAI/asdiv/discussions/1/files, README at refs/pr/1). The
        # default branch, as stored (commit fbd8b42), holds only a loading script asdiv.py and no parquet, so the
        # file is read from refs/pr/1. NOT confirmed: whether that PR was merged into main since.
        SetSpec("asdiv", "numeric", "EleutherAI/asdiv", {"test": "asdiv/validation-00000-of-00001.parquet"},
                _parse_asdiv, "diverse word problems; '9 (apples)' and some text answers", hub_revision="refs/pr/1"),
        # hails/agieval-sat-math. Confirmed: data/test-00000-of-00001.parquet in the file tree and the card's
        # features query (string), choices (list of string), gold (list of int64), 220 test rows
        # (https://huggingface.co/datasets/hails/agieval-sat-math/blob/9d7770b8f559afe512ade1603181e226aa99c134/
        # README.md). This is AGIEval's 220-question SAT-Math (as shared sat_math/agieval_sat-math.jsonl), not
        # the 32-question file most math harnesses use (shared sat_math/test.jsonl).
        SetSpec("sat_math", "choice", "hails/agieval-sat-math", _parquet_split("data/", "test"), _parse_sat_math,
                "SAT math, 4 options"),
        # regisss/math_qa. Confirmed: public loaders use load_dataset("regisss/math_qa") with splits train,
        # validation and test and columns Problem, Rationale, options, correct, category (those of
        # allenai/math_qa's script: Problem, Rationale, options, correct, annotated_formula, linear_formula,
        # category). NOT confirmed: the file names data/{train,test}-00000-of-00001.parquet (no stored file
        # listing or card of this repo).
        SetSpec("mathqa", "choice", "regisss/math_qa", _parquet_split("data/", "train", "test"), _parse_mathqa,
                "MathQA, 5 options 'a ) .. , b ) ..'"),
        # TIGER-Lab/MMLU-STEM. Confirmed: data/test-00000-of-00001.parquet in the file tree
        # (https://huggingface.co/datasets/TIGER-Lab/MMLU-STEM/tree/main/data, commit 8718fbc) and the card's
        # features question (string), choices (list of string), subject (string), answer (int64), 3,153 test rows
        # (the shared harness file has 3,018).
        SetSpec("mmlu_stem", "choice", "TIGER-Lab/MMLU-STEM", _parquet_split("data/", "test"), _parse_mmlu_stem,
                "MMLU STEM subjects, 4 options"),
    )
}


def _toy_sets() -> tuple[str, ...]:
    """The toy set names, or none while imm_ray.data.toy is not importable (it is built separately)."""
    try:
        from imm_ray.data.toy import TOY_SETS
    except ImportError:
        return ()
    return tuple(TOY_SETS)


def known_sets() -> list[str]:
    """The benchmark names in the paper's order (ID first, then OOD), then the toy sets."""
    return [*REGISTRY, *_toy_sets()]


def require_known(name: str) -> None:
    """Raise a :class:`DataError` listing the known sets unless ``name`` is one of them."""
    if name not in REGISTRY and name not in _toy_sets():
        raise DataError(f"unknown data set {name!r}; known sets: {', '.join(known_sets())}")


def is_toy(name: str) -> bool:
    return name not in REGISTRY and name in _toy_sets()


def get_spec(name: str) -> SetSpec:
    """The spec of a benchmark set (toy sets have none); an unknown name raises a :class:`DataError`."""
    require_known(name)
    if name not in REGISTRY:
        raise DataError(f"{name!r} is a generated toy set; it has no file or hub source")
    return REGISTRY[name]


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def load_set(
    name: str,
    split: str = "test",
    *,
    path: str | Path | None = None,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[Problem]:
    """The records of one set and split, at most ``limit`` of them (see the module docstring for the sources).

    ``seed`` only matters for toy sets, which are generated.
    """
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0, got {limit}")
    if is_toy(name):
        if path is not None:
            raise DataError(f"{name!r} is a generated toy set; it cannot be read from {path}")
        from imm_ray.data.toy import load_toy

        try:
            return load_toy(name, split, limit, seed)
        except ValueError as error:  # an unknown split
            raise DataError(str(error)) from None
    spec = get_spec(name)
    source = resolve_source(spec, split, path=path, data_dir=data_dir)
    return parse_records(spec, split, source, limit=limit)


def resolve_source(
    spec: SetSpec, split: str, *, path: str | Path | None = None, data_dir: str | Path | None = None
) -> Path:
    """The local file to read for ``spec``/``split``, downloading from the hub where that is the source."""
    if path is not None:
        text = str(path)
        if text.startswith(HUB_SCHEME):
            return _hub_reference(spec, split, text)
        local = Path(text).expanduser()
        if not local.is_file():
            raise DataError(f"{spec.name}: data file {local} does not exist")
        return local
    directory = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    if directory:
        candidates = [Path(directory).expanduser() / spec.name / f"{split}{suffix}" for suffix in LOCAL_SUFFIXES]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        if data_dir is not None:  # asked for explicitly: do not silently go to the network
            looked = ", ".join(str(c) for c in candidates)
            raise DataError(f"{spec.name}/{split}: no data file in {directory}; looked for {looked}")
    return _hub_download(spec, split)


def _hub_reference(spec: SetSpec, split: str, reference: str) -> Path:
    """``hf://owner/repo[/file]`` (``hf://datasets/owner/repo/...`` too); without a file, the spec's split file."""
    parts = reference[len(HUB_SCHEME) :].strip("/").split("/")
    if parts and parts[0] == "datasets":
        parts = parts[1:]
    if len(parts) < 2:
        raise DataError(f"{spec.name}: hub reference {reference!r} must look like hf://owner/repo[/file]")
    repo = "/".join(parts[:2])
    filename = "/".join(parts[2:]) or spec.hub_files.get(split)
    if not filename:
        raise DataError(f"{spec.name}: {reference!r} names no file and the set has no hub file for split {split!r}")
    return _download(spec, repo, filename)


def _hub_download(spec: SetSpec, split: str) -> Path:
    filename = spec.hub_files.get(split)
    if filename is None:
        raise DataError(
            f"{spec.name}: no split {split!r} on the hub (it has {', '.join(spec.hub_files)}); "
            f"pass a local file with path= or set {DATA_DIR_ENV}"
        )
    return _download(spec, spec.hub_repo, filename, spec.hub_revision)


def _download(spec: SetSpec, repo: str, filename: str, revision: str | None = None) -> Path:
    """One data file from the Hugging Face hub via huggingface_hub (cached by it); failures name the fallbacks.

    Offline (``HF_HUB_OFFLINE``), or when one connection to the hub fails, only huggingface_hub's cache is
    looked at: its own download retries a failed connection five times with back-off (about 25 s) first."""
    from huggingface_hub import hf_hub_download

    where = {"revision": revision} if revision else {}
    unreachable = hub_unreachable()
    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename, repo_type="dataset",
                                    local_files_only=unreachable is not None, **where))
    except Exception as error:  # huggingface_hub raises many kinds: offline, 404, gated, auth
        why = f"{unreachable}, and the file is not in the local hub cache" if unreachable \
            else f"{type(error).__name__}: {_first_line(error)}"
        raise DataError(
            f"{spec.name}: could not download {filename!r} from hub data set {repo!r} ({why}); pass a local "
            f"file with path= or a folder with data_dir= (or ${DATA_DIR_ENV}) holding {spec.name}/<split>.jsonl"
        ) from error


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face hub cannot be used now (offline mode, or one failed connection), or None."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE is set"
    endpoint = urlsplit(constants.ENDPOINT)
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as error:
        return f"the hub at {constants.ENDPOINT} cannot be reached: {error.strerror or error}"
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def parse_records(spec: SetSpec, split: str, source: Path, *, limit: int | None = None) -> list[Problem]:
    """Parse a local file into :class:`Problem` records; a bad record raises naming file, line and field."""
    problems: list[Problem] = []
    for index, (line, row) in enumerate(_read_rows(source)):
        if limit is not None and index >= limit:
            break
        problems.append(_problem(spec, split, source, index, line, row))
    return problems


def _problem(spec: SetSpec, split: str, source: Path, index: int, line: int, row: Any) -> Problem:
    where = f"{source}:{line}"
    if not isinstance(row, Mapping):
        raise DataError(f"{spec.name}: record at {where} is a {type(row).__name__}, expected a JSON object")
    try:
        parsed = spec.parse(row)
    except MissingFieldError as error:
        present = ", ".join(sorted(map(str, row))) or "none"
        raise DataError(
            f"{spec.name}: record at {where} has no field {error} (fields present: {present})"
        ) from None
    except BadFieldError as error:
        raise DataError(f"{spec.name}: record at {where}: {error}") from None
    return Problem(
        id=f"{spec.name}/{split}/{index}",
        set_name=spec.name,
        question=parsed.question,
        answer=parsed.answer,
        kind=spec.kind,
        choices=parsed.choices,
        solution=parsed.solution,
    )


def _read_rows(source: Path) -> Iterator[tuple[int, Any]]:
    """(1-based line or row number, record) for each record of a JSONL, JSON (list) or parquet file."""
    suffix = source.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(source)
    elif suffix == ".json":
        yield from _read_json(source)
    elif suffix == ".parquet":
        yield from _read_parquet(source)
    else:
        raise DataError(f"{source}: unknown data file type {suffix!r}; expected one of {', '.join(LOCAL_SUFFIXES)}")


def _read_jsonl(source: Path) -> Iterator[tuple[int, Any]]:
    with source.open(encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as error:
                raise DataError(f"{source}:{number}: not valid JSON ({error.msg})") from None


def _read_json(source: Path) -> Iterator[tuple[int, Any]]:
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{source}:{error.lineno}: not valid JSON ({error.msg})") from None
    if isinstance(data, Mapping):  # {"data": [...]} / {"test": [...]} wrappers: take the one list inside
        lists = [value for value in data.values() if isinstance(value, list)]
        if len(lists) != 1:
            raise DataError(f"{source}: expected a JSON list of records (or an object holding exactly one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{source}: expected a JSON list of records, got {type(data).__name__}")
    # JSON files have no per-record lines; the 1-based record number stands in for the line.
    yield from enumerate(data, start=1)


def _read_parquet(source: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(source)
    except Exception as error:  # pyarrow raises ArrowInvalid / OSError for non-parquet bytes
        raise DataError(f"{source}: not a readable parquet file ({error})") from None
    yield from enumerate(table.to_pylist(), start=1)
