"""DeepSpeed's shm op loaded by the SFT workers: a killed worker's leftover build lock no longer hangs the next."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from actors.cluster import EXTENSIONS_DIR
from actors.sft.shm_op import LOCK_NAME, extensions_lock

ROOT = Path(__file__).resolve().parents[2]
OP_FOLDER = Path(EXTENSIONS_DIR) / "deepspeed_shm_comm"


def run_python(code: str, extensions: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


@pytest.fixture
def extensions_with_a_leftover_lock(tmp_path: Path) -> Path:
    """A copy of the op `make setup` built (mtimes kept, so nothing is rebuilt) whose build folder still holds the
    ``lock`` file of a load that was killed."""
    if not (OP_FOLDER / "deepspeed_shm_comm.so").is_file():
        pytest.skip(f"DeepSpeed's shm op is not built in {EXTENSIONS_DIR} (make setup builds it)")
    extensions = tmp_path / "torch_extensions"
    shutil.copytree(OP_FOLDER, extensions / OP_FOLDER.name, ignore=shutil.ignore_patterns("lock"))
    (extensions / OP_FOLDER.name / "lock").touch()
    return extensions


def test_deepspeed_alone_waits_forever_on_a_leftover_lock(extensions_with_a_leftover_lock: Path) -> None:
    """What the workers met before load_shm_op: DeepSpeed's own loader never returns."""
    with pytest.raises(subprocess.TimeoutExpired):
        run_python("from deepspeed.comm.torch import build_shm_op; build_shm_op()", extensions_with_a_leftover_lock,
                   timeout=10)


def test_load_shm_op_removes_a_leftover_lock_and_loads(extensions_with_a_leftover_lock: Path) -> None:
    done = run_python("from actors.sft.shm_op import load_shm_op; print('LOADED', load_shm_op() is not None)",
                      extensions_with_a_leftover_lock, timeout=120)
    assert "LOADED True" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    assert not (extensions_with_a_leftover_lock / OP_FOLDER.name / "lock").exists()


def test_the_folder_lock_dies_with_its_holder(tmp_path: Path) -> None:
    """A process killed while it holds the lock (SIGKILL: no cleanup runs) leaves nothing that blocks the next."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
         "from actors.sft.shm_op import extensions_lock\n"
         "with extensions_lock(Path(sys.argv[1])):\n    print('HELD', flush=True)\n    time.sleep(60)\n",
         str(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "HELD"
        assert (tmp_path / LOCK_NAME).exists()
        holder.kill()
        holder.wait(timeout=10)
        done = run_python("import sys\nfrom pathlib import Path\nfrom actors.sft.shm_op import extensions_lock\n"
                          f"with extensions_lock(Path({str(tmp_path)!r})):\n    print('ACQUIRED')", tmp_path,
                          timeout=30)
        assert "ACQUIRED" in done.stdout, done.stderr[-2000:]
    finally:
        holder.kill()
