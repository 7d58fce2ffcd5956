"""``imm-ray plan`` (imm_ray/cli/plan.py; not test_plan.py, the name of tests/memory/test_plan.py): the plan
printed, a config that cannot fit refused in one line (exit 2), cached stages shown done."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from imm_ray.cli import app

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def cpu_cluster(tmp_path: Path, cpus: int = 4, memory_gib: int = 16) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(f"head_node_type: head\navailable_node_types:\n"
                    f"  head: {{resources: {{CPU: {cpus}, memory: {memory_gib * 2**30}}}}}\n")
    return path


def test_paper_config_plan_without_stages():
    result = runner.invoke(app, ["plan", str(ROOT / "configs/qwen2.5-1.5b-math.yaml"), "--no-stages", "--details",
                                 "--cluster", str(ROOT / "cluster.yaml")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "every stage fits" in result.output
    for text in ("sft (Qwen2.5-1.5B-Instruct)", "DeepSpeed ZeRO-3, bf16, 8 workers", "AdamW fp32 master",
                 "vLLM, TP 1", "1.54B parameters"):
        assert text in result.output


def test_a_config_that_cannot_fit_is_refused_in_one_line(tmp_path):
    result = runner.invoke(app, ["plan", str(ROOT / "configs/qwen2.5-0.5b-gsm8k.yaml"), "--no-stages",
                                 "--cluster", str(cpu_cluster(tmp_path))], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    error = result.output.strip().splitlines()[-1]
    assert error.startswith("error: memory plan: stage generate (Qwen2.5-0.5B-Instruct)")
    assert "1 GPUs asked, 0 there" in error


def test_cached_stages_are_shown_done(tmp_path):
    """Plan the toy run, finish one of its stages in the stage store as the loop would, plan again."""
    from imm_ray.config import load_config
    from imm_ray.loop import IterationLoop

    overrides = ["--set", f"experiment.output_dir={tmp_path / 'runs'}", "--set", "experiment.iterations=1",
                 "--set", "data.train_limit=8", "--set", "data.eval_limit=4"]
    args = ["plan", str(ROOT / "configs/toy.yaml"), *overrides, "--cluster", str(cpu_cluster(tmp_path))]
    first = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert first.exit_code == 0, first.output
    assert "0 of" in first.output and "stages done (cached)" in first.output

    cfg = load_config(ROOT / "configs/toy.yaml", [o for o in overrides if o != "--set"])
    loop = IterationLoop(cfg)
    event = next(e for e in loop.plan() if e.kind == "eval")
    loop.store.run(event.kind, event.fingerprint, lambda out: out.mkdir(parents=True) or {})
    second = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert second.exit_code == 0, second.output
    assert "1 of" in second.output
    line = next(line for line in second.output.splitlines() if event.link in line)
    assert "done" in line and "eval" in line
