import json
import os

import pytest

from imm_ray.stages import RECORD_NAME, StageStore, fingerprint, model_fingerprint


def test_fingerprint_ignores_key_order_and_sees_values():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_stage_runs_once_and_links(tmp_path):
    store = StageStore(tmp_path)
    calls = []

    def work(out):
        calls.append(out)
        out.mkdir()
        (out / "x.txt").write_text("hi")
        return {"n": 1}

    link = tmp_path / "imm" / "iter_0" / "generate"
    first = store.run("generate", "abc", work, link=link)
    second = store.run("generate", "abc", work, link=tmp_path / "vanilla" / "iter_0" / "generate")
    assert first == second and len(calls) == 1
    assert (link / "x.txt").read_text() == "hi"
    assert not os.path.isabs(os.readlink(link))
    record = json.loads((first / RECORD_NAME).read_text())
    assert record["fingerprint"] == "abc" and record["summary"] == {"n": 1}


def test_failed_stage_leaves_nothing_and_is_redone(tmp_path):
    store = StageStore(tmp_path)

    def broken(out):
        out.mkdir()
        (out / "half").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        store.run("sft", "f1", broken)
    assert not store.is_done("sft", "f1")
    assert list(store.cache_dir.glob("*sft-f1*")) == [] or all(p.suffix == ".lock" for p in store.cache_dir.glob("*sft-f1*"))
    folder = store.run("sft", "f1", lambda out: None)
    assert folder.is_dir() and store.is_done("sft", "f1")


def test_folder_without_record_is_unfinished_and_replaced(tmp_path):
    store = StageStore(tmp_path)
    stale = store.folder("merge", "f2")
    stale.mkdir(parents=True)
    (stale / "partial").write_text("x")
    assert not store.is_done("merge", "f2")
    store.run("merge", "f2", lambda out: out.mkdir() or {"ok": True})
    assert not (stale / "partial").exists() and store.is_done("merge", "f2")


def test_leftover_temporary_folders_are_cleaned(tmp_path):
    store = StageStore(tmp_path)
    leftover = store.cache_dir / ".sft-x.tmp-1234"
    leftover.mkdir()
    done = store.run("generate", "g", lambda out: None)
    assert store.clean_leftovers() == [leftover]
    assert done.is_dir()


def test_model_fingerprint_uses_stage_record_or_files(tmp_path):
    store = StageStore(tmp_path)
    folder = store.run("sft", "fp-of-stage", lambda out: None)
    assert model_fingerprint(folder) == "fp-of-stage"
    external = tmp_path / "model"
    external.mkdir()
    (external / "config.json").write_text("{}")
    (external / "model.safetensors").write_bytes(b"1234")
    before = model_fingerprint(external)
    (external / "config.json").write_text('{"x": 1}')
    assert model_fingerprint(external) != before
    assert model_fingerprint("Qwen/Qwen2.5-0.5B") == model_fingerprint("Qwen/Qwen2.5-0.5B")


def test_leftover_of_a_stage_being_written_elsewhere_is_kept(tmp_path):
    import fcntl

    store = StageStore(tmp_path)
    busy = store.cache_dir / ".sft-busy.tmp-aaaa"
    busy.mkdir()
    with open(store.cache_dir / ".sft-busy.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        assert store.clean_leftovers() == []
    assert store.clean_leftovers() == [busy]


WRITER = """
import sys, time
from pathlib import Path
from imm_ray.merge.tensors import staged_folder
from imm_ray.stages import StageStore

cache, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])

def work(out):
    with staged_folder(out, overwrite=False) as staging:  # the merge's own staging folder, beside ``out``
        (staging / "model.safetensors").write_text("weights")
        ready.write_text("writing")
        while not go.exists():
            time.sleep(0.05)
    return {"ok": True}

StageStore(cache).run("merge", "f" * 20, work)
"""

CLEANER = """
import sys
from imm_ray.stages import StageStore
print(len(StageStore(sys.argv[1]).clean_leftovers()))
"""


def test_a_second_process_never_deletes_a_stage_another_process_is_writing(tmp_path):
    """Two processes share one cache: while the first writes a merge stage (its temporary folder and the merge's
    nested staging folder exist), the second starts up and cleans leftovers; nothing of the first is removed."""
    import subprocess
    import sys
    import time

    ready, go = tmp_path / "ready", tmp_path / "go"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(ready), str(go)])
    try:
        deadline = time.time() + 60
        while not ready.exists() and time.time() < deadline and writer.poll() is None:
            time.sleep(0.05)
        assert ready.exists(), "the writer did not start"
        in_progress = sorted(p.name for p in (tmp_path / "_stages").iterdir() if p.is_dir())
        assert any(".partial-" in name for name in in_progress) and any(".tmp-" in name for name in in_progress)
        cleaned = subprocess.run([sys.executable, "-c", CLEANER, str(tmp_path)], capture_output=True, text=True,
                                 check=True)
        assert cleaned.stdout.strip() == "0"
        assert sorted(p.name for p in (tmp_path / "_stages").iterdir() if p.is_dir()) == in_progress
        go.write_text("go")
        assert writer.wait(timeout=60) == 0
    finally:
        writer.kill()
    store = StageStore(tmp_path)
    assert store.is_done("merge", "f" * 20)
    assert (store.folder("merge", "f" * 20) / "model.safetensors").read_text() == "weights"
    # a killed writer's leftovers (no lock held any more) are cleaned
    (store.cache_dir / f".merge-{'e' * 20}.tmp-1234abcd").mkdir()
    (store.cache_dir / f"..merge-{'e' * 20}.tmp-1234abcd.partial-99").mkdir()
    assert len(store.clean_leftovers()) == 2
