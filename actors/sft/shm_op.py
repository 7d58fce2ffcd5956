"""DeepSpeed's JIT-built shared-memory op: built ahead of the first run (`make setup` runs this module), and loaded
by every SFT worker under a lock that dies with its holder.

DeepSpeed compiles its shared-memory all-reduce op (``ShareMemCommBuilder``) the first time a worker group starts
on CPU: 33-50 s on a 2-core machine, paid by the first SFT stage of the first run. Built here into the folder the
workers use (``actors.cluster.EXTENSIONS_DIR``), the first run loads it like every later one.

Why a lock of our own. torch's extension loader guards each build folder with a ``lock`` file (``FileBaton``) that
every load creates and removes, even when nothing is rebuilt, and that waits forever while the file exists. A
worker killed between the two (Ray Train tears down the group when the other worker fails, a Ctrl-C, the OOM
killer) leaves the file behind, and every later SFT stage on the machine hangs in ``init_distributed`` (seen
2026-12-04: both workers waiting in ``FileBaton.wait`` after a failed stage). So the workers load the op through
:func:`load_shm_op`: under an ``fcntl`` lock on the folder, which the OS releases when its holder dies, no other of
our loads is running, so a ``lock`` file found there is a leftover and is removed first. DeepSpeed keeps the loaded
op per process, and its own ``init_distributed`` then takes it from there without touching the folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from actors.cluster import EXTENSIONS_DIR

LOCK_NAME = "imm-ray-ops.lock"


@contextlib.contextmanager
def extensions_lock(folder: Path) -> Iterator[None]:
    """Exclusive use of the extensions folder among this project's processes; released by the OS on any exit."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_NAME, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_shm_op() -> Any:
    """DeepSpeed's shm all-reduce op, built if needed and loaded into this process (None where DeepSpeed has no
    such op for this machine, e.g. on GPUs); a build folder's leftover ``lock`` file is removed first."""
    os.environ["TORCH_EXTENSIONS_DIR"] = EXTENSIONS_DIR
    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm.torch import build_shm_op  # deepspeed's own loader: the same build init_distributed loads

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:  # no such op here (GPUs): nothing is built, and the folder may not be writable
        return None
    folder = Path(EXTENSIONS_DIR)
    with extensions_lock(folder):
        (folder / builder.name / "lock").unlink(missing_ok=True)
        return build_shm_op()


def main() -> None:
    started = time.monotonic()
    op = load_shm_op()
    what = "built or found" if op is not None else "not available on this machine (DeepSpeed falls back to gloo)"
    print(f"DeepSpeed shm all-reduce op {what} in {time.monotonic() - started:.1f} s: {EXTENSIONS_DIR}")


if __name__ == "__main__":
    main()
