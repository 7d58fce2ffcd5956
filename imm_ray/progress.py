"""How far a long stage has got: one small channel from the code doing the work to whoever shows it.

A stage's work reports :class:`Tick` values (done out of total, a unit, an optional note such as the loss) to a
callback, ``progress``, which its caller may pass (default None: nobody watches). The loop makes the callback of
the stage in progress available to the stage code through :func:`current`, so the stage declarations need no
extra field. Work that happens inside Ray workers reports through the driver: generation counts the rows as
the driver receives them; SFT's rank 0 appends one JSON line per optimizer step to a small file
(:func:`append_step`) that the driver follows while it waits (:func:`follow_steps`).
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Tick:
    """``done`` of ``total`` units (``total`` None: not known in advance); ``note``: e.g. ``loss 0.412``."""

    done: int
    total: int | None
    unit: str
    note: str = ""


ProgressFn = Callable[[Tick], None]

_current: ContextVar[ProgressFn | None] = ContextVar("imm_ray_progress", default=None)


def current() -> ProgressFn | None:
    """The callback of the stage in progress in this thread, if someone watches it."""
    return _current.get()


@contextlib.contextmanager
def reporting(progress: ProgressFn | None) -> Iterator[None]:
    """Make ``progress`` the callback :func:`current` returns while the block runs."""
    token = _current.set(progress)
    try:
        yield
    finally:
        _current.reset(token)


# ---- the SFT step file: written by rank 0 inside a Ray Train worker, followed by the driver -------------------
def append_step(path: Path, step: int, total: int, loss: float) -> None:
    """One line per optimizer step; a file so that it needs no Ray object and survives a worker restart."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps({"step": step, "total": total, "loss": round(loss, 5)}) + "\n")


def step_tick(line: str) -> Tick | None:
    """The tick of one step-file line; None for a line still being written (or not JSON)."""
    try:
        row = json.loads(line)
        return Tick(int(row["step"]), int(row["total"]), "steps", f"loss {float(row['loss']):.3f}")
    except (ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def follow_steps(path: Path | None, progress: ProgressFn | None, every: float = 0.5) -> Iterator[None]:
    """While the block runs, read the lines appended to ``path`` every ``every`` seconds and report them."""
    if path is None or progress is None:
        yield
        return
    stop = threading.Event()

    def read(position: int) -> int:
        if not path.is_file():
            return position
        with open(path) as handle:
            handle.seek(position)
            while (line := handle.readline()).endswith("\n"):
                position = handle.tell()
                tick = step_tick(line)
                if tick is not None:
                    progress(tick)
        return position

    def loop() -> None:
        position = 0
        while not stop.wait(every):
            position = read(position)
        read(position)

    thread = threading.Thread(target=loop, name="imm-ray-sft-steps", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
