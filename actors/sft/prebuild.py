"""Build DeepSpeed's JIT ops the SFT workers load, ahead of the first run (`make setup` calls this).

DeepSpeed compiles its shared-memory all-reduce op (``ShareMemCommBuilder``) the first time a worker group starts
on CPU: 33-50 s on a 2-core machine, paid by the first SFT stage of the first run. Built here into the folder the
workers use (``actors.cluster.EXTENSIONS_DIR``), the first run loads it like every later one.
"""

from __future__ import annotations

import os
import time

from actors.cluster import EXTENSIONS_DIR


def main() -> None:
    os.environ["TORCH_EXTENSIONS_DIR"] = EXTENSIONS_DIR
    from deepspeed.comm.torch import build_shm_op  # deepspeed's own loader: the same build the workers load

    started = time.monotonic()
    op = build_shm_op()
    what = "built or found" if op is not None else "not available on this machine (DeepSpeed falls back to gloo)"
    print(f"DeepSpeed shm all-reduce op {what} in {time.monotonic() - started:.1f} s: {EXTENSIONS_DIR}")


if __name__ == "__main__":
    main()
