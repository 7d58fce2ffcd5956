"""Stage fingerprints, completion records and the shared stage cache.

Every stage output lives once in ``<run>/_stages/<kind>-<fingerprint>/``; the per-strategy folders
(``<run>/<strategy>/iter_<t>/<kind>``) are relative symlinks into it, so a stage that two strategies or two
sweep trials need (iteration 0's generation and SFT, the base model's evaluation) is computed once.

A stage is written into a temporary sibling folder, renamed into place, and only then is its completion record
(``_COMPLETE.json``, holding the fingerprint) written. A folder without that record is unfinished and is redone;
a run killed at any point loses no finished stage. A file lock per stage lets concurrent runs and trials wait for
each other instead of computing the same stage twice, and the start-up cleaner only removes a temporary folder
whose stage lock nobody holds, so two runs sharing one cache never delete each other's work in progress.

What a fingerprint covers (see :class:`imm_ray.steps.Step`, which derives every stage's fingerprint from its
declared fields):
- models by content (:func:`model_fingerprint`): a stage output by its stage fingerprint, any other folder by the
  bytes of its config, tokenizer and weight files (hashed once and remembered by size and mtime);
- code by :func:`code_identity`: the source of the modules a stage runs, found as the static import closure of its
  entry modules inside this project's packages, so editing code a stage does not import leaves it reusable.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

RECORD_NAME = "_COMPLETE.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
PROJECT_ROOT = Path(__file__).resolve().parent.parent  # the folder holding imm_ray/, actors/ and tune/
PROJECT_PACKAGES = ("imm_ray", "actors", "tune")
LARGE_VALUE_CHARS = 2000  # a step value longer than this as JSON enters its identity (and record) as a hash
HASH_MEMO_ENV = "IMM_RAY_HASH_MEMO"  # where content hashes of external model files are remembered
# A temporary stage folder: ".<kind>-<fingerprint>.tmp-<hex>" (anything a stage writes inside or beside it, like
# the merge's own ".<tmp>.partial-<hex>" staging folder, carries the same stage name).
_TMP_STAGE = re.compile(r"\.(?P<stage>[A-Za-z0-9_]+-[A-Za-z0-9_\-]+?)\.tmp-[0-9a-f]+")


def fingerprint(payload: Mapping[str, Any]) -> str:
    """A stable hash of a JSON-serialisable mapping (key order does not matter)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def model_fingerprint(path: str | Path) -> str:
    """Identify a model folder: a stage output by its stage fingerprint, any other folder by its content.

    An external folder is identified by the bytes of every file a stage reads from it: config and generation
    config, tokenizer files (vocabulary, merges, special tokens, chat template) and weights. Hashing a 7B model's
    weights takes a while, so each file's hash is remembered by (path, size, mtime) in a memo file and computed
    again only when the file changes. A hub id that is not a local folder is identified by its name.
    """
    folder = Path(path)
    record = read_record(folder.resolve()) if folder.is_dir() else None
    if record is not None:
        return str(record["fingerprint"])
    if not folder.is_dir():
        return fingerprint({"hub_id": str(path)})
    files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
    return fingerprint({f.name: file_hash(f) for f in files})


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes, remembered by (resolved path, size, mtime_ns) across processes."""
    real = path.resolve()
    stat = real.stat()
    key = f"{real}|{stat.st_size}|{stat.st_mtime_ns}"
    memo_path = Path(os.environ.get(HASH_MEMO_ENV, Path.home() / ".cache" / "imm-ray" / "file-hashes.json"))
    memo = _read_memo(memo_path)
    if key in memo:
        return memo[key]
    digest = hashlib.sha256()
    with open(real, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    value = digest.hexdigest()
    if stat.st_size >= 1 << 20:  # small files are cheaper to hash than to remember
        memo[key] = value
        with contextlib.suppress(OSError):
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            _write_json_atomically(memo_path, memo)
    return value


def _read_memo(path: Path) -> dict[str, str]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------------------------------ code identity


def _module_file(name: str) -> Path | None:
    """The source file of a project module (``a.b`` → a/b.py or a/b/__init__.py), or None if it is not ours."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = PROJECT_ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports_of(name: str, file: Path) -> set[str]:
    """Project modules a module imports anywhere in its body (lazy imports inside functions count too)."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{anchor}.{node.module}" if node.module else anchor
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # "from pkg import submodule"
    return {m for m in found if _module_file(m) is not None}


@functools.lru_cache(maxsize=None)
def module_closure(*entries: str) -> tuple[str, ...]:
    """The project modules that running ``entries`` can execute: their static import closure, parent packages
    included (importing ``a.b`` runs ``a/__init__.py``)."""
    seen: set[str] = set()
    pending = list(entries)
    while pending:
        name = pending.pop()
        if name in seen or _module_file(name) is None:
            continue
        seen.add(name)
        parts = name.split(".")
        pending.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        pending.extend(_imports_of(name, _module_file(name)))
    return tuple(sorted(seen))


@functools.lru_cache(maxsize=None)
def code_identity(*entries: str) -> str:
    """A hash of the source of every module in the import closure of ``entries`` (see :func:`module_closure`)."""
    missing = [e for e in entries if _module_file(e) is None]
    if missing:
        raise ValueError(f"code_identity: {missing} are not modules of this project")
    return fingerprint({name: hashlib.sha256(_module_file(name).read_bytes()).hexdigest()
                        for name in module_closure(*entries)})


def read_record(folder: Path) -> dict[str, Any] | None:
    """The completion record of a stage folder, or None if the stage is not complete."""
    try:
        return json.loads((folder / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None


def _write_json_atomically(path: Path, payload: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


class StageStore:
    """The content-addressed stage cache of one run folder."""

    def __init__(self, run_dir: str | Path, cache_dir: str | Path | None = None) -> None:
        """``cache_dir`` defaults to ``<run_dir>/_stages``; sweep trials pass the sweep's shared one."""
        self.run_dir = Path(run_dir)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.run_dir / "_stages"
        self.cache_dir.mkdir(parents=True, exist_ok=True)

    def folder(self, kind: str, stage_fingerprint: str) -> Path:
        return self.cache_dir / f"{kind}-{stage_fingerprint}"

    def is_done(self, kind: str, stage_fingerprint: str) -> bool:
        record = read_record(self.folder(kind, stage_fingerprint))
        return record is not None and record.get("fingerprint") == stage_fingerprint

    def run(
        self,
        kind: str,
        stage_fingerprint: str,
        work: Callable[[Path], Mapping[str, Any] | None],
        *,
        link: Path | None = None,
        inputs: Mapping[str, Any] | None = None,
    ) -> Path:
        """Run ``work(tmp_folder)`` unless the stage is already done; return the finished folder.

        ``work`` receives a folder path that does not exist yet (create it, or let a library create it); what it
        returns is stored in the completion record as the stage's summary.
        """
        final = self.folder(kind, stage_fingerprint)
        with self._lock(final):
            if not self.is_done(kind, stage_fingerprint):
                self._compute(kind, stage_fingerprint, final, work, inputs or {})
        if link is not None:
            _point_link(link, final)
        return final

    def _compute(self, kind: str, stage_fingerprint: str, final: Path, work: Callable, inputs: Mapping) -> None:
        tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
        started = time.time()
        try:
            summary = work(tmp)
            tmp.mkdir(parents=True, exist_ok=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():  # an unfinished folder from an earlier crash between rename and record
            shutil.rmtree(final)
        os.rename(tmp, final)
        record = {
            "kind": kind,
            "fingerprint": stage_fingerprint,
            "inputs": dict(inputs),
            "summary": dict(summary or {}),
            "started": started,
            "seconds": round(time.time() - started, 3),
        }
        _write_json_atomically(final / RECORD_NAME, record)

    @contextlib.contextmanager
    def _lock(self, final: Path) -> Iterator[None]:
        lock_path = final.with_name(f".{final.name}.lock")
        with open(lock_path, "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def clean_leftovers(self) -> list[Path]:
        """Remove temporary folders that a killed run left behind: never a finished stage, and never one that
        another process is still writing (its stage's lock is held while it writes, and every temporary name,
        the merge's nested staging folders included, carries the stage's name)."""
        removed = []
        for path in self.cache_dir.iterdir():
            match = _TMP_STAGE.search(path.name)
            if match is None or not path.name.startswith(".") or not path.is_dir():
                continue
            if not _is_locked(self.cache_dir / f".{match.group('stage')}.lock"):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed


def _is_locked(lock_path: Path) -> bool:
    """Whether another process holds this stage's lock right now."""
    if not lock_path.exists():
        return False
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def _point_link(link: Path, target: Path) -> None:
    """Make ``link`` a relative symlink to ``target``, replacing an older link atomically."""
    link.parent.mkdir(parents=True, exist_ok=True)
    relative = os.path.relpath(target, link.parent)
    if link.is_symlink() and os.readlink(link) == relative:
        return
    tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex[:8]}.link")
    os.symlink(relative, tmp)
    os.replace(tmp, link)


# --------------------------------------------------------------------------------------------- declared stages


class Step(BaseModel):
    """Base of a stage declaration (``imm_ray.steps``): a frozen object whose fields are everything it reads.

    Subclasses are frozen pydantic models. Fields holding another :class:`Step` (or a tuple of them) are its
    arguments, the stages it depends on (:meth:`arguments`); every other field is a value it reads. The fingerprint
    is derived from that declaration alone: the kind, the values (minus those named in ``not_identity``, with the
    reason written next to them), each argument's fingerprint, the code identity of the modules in ``code`` and the
    step class's own source. Nothing is assembled by hand, so a field added to a step is fingerprinted by adding it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    kind: ClassVar[str] = "step"
    code: ClassVar[tuple[str, ...]] = ()  # entry modules of the code the stage runs; their import closure is hashed
    not_identity: ClassVar[tuple[str, ...]] = ()  # fields that cannot change the output (a pool size, a worker count)

    def arguments(self) -> dict[str, Step | tuple[Step, ...]]:
        return {name: value for name, value in self._fields().items() if _is_step_value(value)}

    def values(self) -> dict[str, Any]:
        """The values the step reads, as JSON; a large one (a data set's problems and prompts) by its hash, so the
        completion record that stores them stays small."""
        values = {}
        for name, value in self._fields().items():
            if name in self.not_identity or _is_step_value(value):
                continue
            plain = _jsonable(value)
            text = json.dumps(plain, sort_keys=True, separators=(",", ":"))
            values[name] = plain if len(text) <= LARGE_VALUE_CHARS else {"sha256": hashlib.sha256(text.encode()).hexdigest()}
        return values

    @functools.cached_property
    def identity(self) -> dict[str, Any]:
        """What the fingerprint hashes (also stored in the completion record, so a reuse can be explained)."""
        arguments = {
            name: [a.fingerprint for a in value] if isinstance(value, tuple) else value.fingerprint
            for name, value in self.arguments().items()
        }
        return {
            "kind": self.kind, "values": self.values(), "arguments": arguments,
            "code": code_identity(*self.code) if self.code else None,
            "declaration": _declaration_hash(type(self)),
        }

    @functools.cached_property
    def fingerprint(self) -> str:
        return fingerprint(self.identity)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Step:
        """A copy whose identity and fingerprint are derived afresh (pydantic copies cached values along)."""
        copy = super().model_copy(update=update, deep=deep)
        for cached in ("identity", "fingerprint"):
            copy.__dict__.pop(cached, None)
        return copy

    def _fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in type(self).model_fields}


@functools.lru_cache(maxsize=None)
def _declaration_hash(cls: type) -> str:
    """The step class's own source (its ``run`` lives there), or its name where no source exists."""
    import inspect

    try:
        text = inspect.getsource(cls)
    except (OSError, TypeError):
        text = f"{cls.__module__}.{cls.__qualname__}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _is_step_value(value: Any) -> bool:
    return isinstance(value, Step) or (isinstance(value, tuple) and bool(value) and all(isinstance(v, Step) for v in value))


def _jsonable(value: Any) -> Any:
    """Plain JSON data of a field: pydantic models and dataclasses by their fields, also inside tuples."""
    import dataclasses

    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value
