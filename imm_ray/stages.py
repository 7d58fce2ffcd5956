"""Stage fingerprints, completion records and the shared stage cache.

Every stage output lives once in ``<run>/_stages/<kind>-<fingerprint>/``; the per-strategy folders
(``<run>/<strategy>/iter_<t>/<kind>``) are relative symlinks into it, so a stage that two strategies or two
sweep trials need (iteration 0's generation and SFT, the base model's evaluation) is computed once.

A stage is written into a temporary sibling folder, renamed into place, and only then is its completion record
(``_COMPLETE.json``, holding the fingerprint) written. A folder without that record is unfinished and is redone;
a run killed at any point loses no finished stage. A file lock per stage lets concurrent trials wait for each
other instead of computing the same stage twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

RECORD_NAME = "_COMPLETE.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def fingerprint(payload: Mapping[str, Any]) -> str:
    """A stable hash of a JSON-serialisable mapping (key order does not matter)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def model_fingerprint(path: str | Path) -> str:
    """Identify a model folder: a stage output by its stage fingerprint, any other folder by its files.

    External folders are identified by config.json's bytes and the names, sizes and modification times of the
    weight files (hashing many GB of weights on every start would cost more than the stages it guards). A hub id
    that is not a local folder is identified by its name.
    """
    folder = Path(path)
    record = read_record(folder.resolve()) if folder.is_dir() else None
    if record is not None:
        return str(record["fingerprint"])
    if not folder.is_dir():
        return fingerprint({"hub_id": str(path)})
    entries: dict[str, Any] = {}
    config = folder / "config.json"
    if config.is_file():
        entries["config"] = hashlib.sha256(config.read_bytes()).hexdigest()
    for file in sorted(folder.iterdir()):
        if file.suffix in WEIGHT_SUFFIXES or file.name.endswith(".index.json"):
            stat = file.stat()
            entries[file.name] = [stat.st_size, stat.st_mtime_ns]
    return fingerprint(entries)


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
        """Remove temporary folders that a killed run left behind (never a finished stage, and never one that a
        concurrent trial is still writing: its stage lock is held)."""
        removed = []
        for path in self.cache_dir.glob(".*.tmp-*"):
            stage_name = path.name[1:].rsplit(".tmp-", 1)[0]
            if path.is_dir() and not _is_locked(self.cache_dir / f".{stage_name}.lock"):
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
