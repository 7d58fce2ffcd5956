"""One iteration of the real loop on the shipped toy model, then a run killed mid-SFT and resumed.

Real pieces throughout: Ray Data generation actors, Ray Train + DeepSpeed SFT with 2 workers, the merge actor
pool and evaluation, on the session's local 2-CPU Ray cluster.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

from imm_ray.config import load_config
from imm_ray.loop import IterationLoop, read_history
from imm_ray.stages import RECORD_NAME

pytestmark = pytest.mark.integration
SEED = "seed_0"

SMALL = [
    "experiment.iterations=1", "experiment.strategies=[imm, vanilla]", "experiment.seeds=[0]",
    "data.train_limit=24", "data.eval_limit=8", "generation.samples_per_question=2",
    "generation.temperatures=[0.6]", "eval.samples=2", "eval.k=[1,2]", "sft.epochs=2",
    "sft.checkpoints=true", "sft.checkpoint_every_steps=1",  # a run killed mid-SFT has a checkpoint to resume
]


def _overrides(output_dir: Path) -> list[str]:
    return [*SMALL, f"experiment.output_dir={output_dir}", "experiment.name=it"]


def _tensors(folder: Path) -> dict:
    """Every tensor of an HF folder, whatever its shard file names."""
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _stage_folders(run_dir: Path, kind: str) -> list[Path]:
    return sorted(p for p in (run_dir / "_stages").glob(f"{kind}-*") if p.is_dir())


def _stage_names(run_dir: Path) -> list[str]:
    """kind-fingerprint of every finished stage (not Ray Train's own storage folder, _ray_train)."""
    return sorted(p.parent.name for p in (run_dir / "_stages").glob(f"*/{RECORD_NAME}"))


def _records(run_dir: Path) -> dict[str, dict]:
    return {p.name: json.loads((p / RECORD_NAME).read_text()) for p in (run_dir / "_stages").iterdir()
            if (p / RECORD_NAME).is_file()}


@pytest.fixture(scope="module")
def finished_run(ray_cluster, tmp_path_factory) -> Path:
    config = load_config(Path("configs/toy.yaml"), _overrides(tmp_path_factory.mktemp("loop")))
    result = IterationLoop(config).run()
    return result.run_dir


def test_one_iteration_runs_every_stage_once(finished_run):
    run_dir = finished_run
    assert len(_stage_folders(run_dir, "generate")) == 1  # iteration 0 is shared by IMM and vanilla
    assert len(_stage_folders(run_dir, "sft")) == 1
    assert len(_stage_folders(run_dir, "merge")) == 1
    assert len(_stage_folders(run_dir, "eval")) == 3  # base, SFT_0, Merge_0
    for strategy in ("imm", "vanilla"):
        assert (run_dir / SEED / strategy / "iter_0" / "generate").resolve() == _stage_folders(run_dir, "generate")[0]
    samples = pd.read_parquet(run_dir / SEED / "imm" / "iter_0" / "generate" / "samples.parquet")
    assert len(samples) == 24 * 2 and samples["correct"].any()
    pairs = pd.read_parquet(run_dir / SEED / "imm" / "iter_0" / "sft_data" / "pairs.parquet")
    assert len(pairs) <= samples["correct"].sum()
    assert json.loads((run_dir / SEED / "imm" / "iter_0" / "sft" / "training_log.json").read_text())["world_size"] == 2
    report = (run_dir / "report.md").read_text()
    assert "IMM · Merge_0" in report and "STaR (vanilla) · SFT_0" in report and "weight of the ORIGINAL base" in report
    assert (run_dir / "accuracy_over_iterations.png").stat().st_size > 5000


def test_merged_model_is_alpha_between_base_and_sft(finished_run):
    """With p = 0.2 the merge is not a plain average, but every merged entry lies within the DARE envelope."""
    merged = _tensors(finished_run / SEED / "imm" / "iter_0" / "merge")
    base = _tensors(Path(load_config(Path("configs/toy.yaml")).model.resolved_path()))
    sft = _tensors(finished_run / SEED / "imm" / "iter_0" / "sft")
    name = next(n for n in merged if n.endswith("mlp.down_proj.weight"))
    delta = sft[name] - base[name]
    kept = 0.5 * base[name] + 0.5 * (base[name] + delta / 0.8)
    dropped = base[name]
    ok = (merged[name] - kept).abs().lt(1e-5) | (merged[name] - dropped).abs().lt(1e-6)
    assert ok.all()


def test_rerun_reuses_every_stage(finished_run):
    before = _records(finished_run)
    config = load_config(finished_run / "config.yaml")
    again = IterationLoop(config, run_dir=finished_run).run()
    assert _records(finished_run) == before
    assert again.events and all(e.status == "reused" for e in again.events)
    history = read_history(finished_run)
    assert [h["computed"] for h in history] == [len(before), 0]  # the first invocation's work stays on record
    assert "## Run history" in (finished_run / "report.md").read_text()


def test_concurrent_chains_compute_the_same_stages_to_the_same_results(finished_run, tmp_path):
    """IMM and vanilla at once (resources.concurrent_chains=2), each chain in a driver thread: the same stages
    (fingerprints) as the sequential run, each computed once (iteration 0, which both chains declare, by whichever
    chain got there first), and the same samples and metrics."""
    config = load_config(Path("configs/toy.yaml"), [*_overrides(tmp_path), "resources.concurrent_chains=2"])
    result = IterationLoop(config).run()
    stages = _stage_names(result.run_dir)
    assert stages == _stage_names(finished_run)
    assert sorted(e.fingerprint for e in result.events if e.status == "computed") == sorted(
        name.split("-", 1)[1] for name in stages)
    for folder in _stage_folders(result.run_dir, "eval"):
        before = finished_run / "_stages" / folder.name
        pd.testing.assert_frame_equal(pd.read_parquet(folder / "samples.parquet"),
                                      pd.read_parquet(before / "samples.parquet"))
        assert (folder / "metrics.csv").read_text() == (before / "metrics.csv").read_text()
    assert (result.run_dir / "report.md").is_file()


def test_killed_mid_sft_resumes_from_its_checkpoint_to_the_same_results(finished_run, ray_cluster, tmp_path):
    """Kill the whole `imm-ray run` process (SIGKILL) once Ray Train has recorded a checkpoint, run the same command
    again: the finished generation is not redone, SFT resumes from the checkpoint Ray Train wrote (fewer
    optimizer steps redone), and the results equal the uninterrupted run's."""
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    command = [sys.executable, "-m", "imm_ray", "run", "configs/toy.yaml",
               *[f"--set={o}" for o in _overrides(tmp_path)]]
    run_dir = tmp_path / "it"
    train_storage = run_dir / "_stages" / "_ray_train"
    process = subprocess.Popen(command, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: _registered_checkpoint(train_storage), process, timeout=400)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not _stage_folders(run_dir, "sft"), "SFT must not be complete when the run was killed"
    generate_before = _records(run_dir)[_stage_folders(run_dir, "generate")[0].name]

    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, timeout=900)

    assert _records(run_dir)[_stage_folders(run_dir, "generate")[0].name] == generate_before
    assert not list((run_dir / "_stages").glob(".*.tmp-*"))
    log = json.loads((run_dir / SEED / "imm" / "iter_0" / "sft" / "training_log.json").read_text())
    reference_log = json.loads((finished_run / SEED / "imm" / "iter_0" / "sft" / "training_log.json").read_text())
    resumed_attempt = log["attempts"][-1]
    assert resumed_attempt["resumed_from"] is not None and resumed_attempt["start_step"] > 0
    assert log["optimizer_steps"] == reference_log["optimizer_steps"]
    for folder in ("base/eval", f"{SEED}/imm/iter_0/eval_sft", f"{SEED}/imm/iter_0/eval_merge"):
        assert (run_dir / folder / "metrics.csv").read_text() == (finished_run / folder / "metrics.csv").read_text()
    resumed = _tensors(run_dir / SEED / "imm" / "iter_0" / "merge")
    reference = _tensors(finished_run / SEED / "imm" / "iter_0" / "merge")
    assert all((resumed[name] == reference[name]).all() for name in reference)


def _registered_checkpoint(storage: Path) -> bool:
    """Ray Train has recorded a checkpoint in its run snapshot (what a restarted run reads), not just written one."""
    snapshots = list(storage.glob("sft-*/checkpoint_manager_snapshot.json")) if storage.exists() else []
    return any("checkpoint_epoch" in path.read_text() for path in snapshots)


def _wait_for(condition, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if process.poll() is not None:
            pytest.fail(f"the run ended (exit {process.returncode}) before SFT started")
        time.sleep(0.5)
    pytest.fail("SFT did not start in time")
