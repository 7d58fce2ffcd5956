"""``imm-ray status``: every stage of a run from its saved config, done or pending, without a cluster."""

from typer.testing import CliRunner

from imm_ray.cli import app
from imm_ray.config import load_config, save_config
from imm_ray.loop import IterationLoop


def test_status_lists_every_stage_and_sees_finished_ones(tmp_path):
    config = load_config(None, ["experiment.iterations=1", "data.train_limit=4", "data.eval_limit=2",
                                f"experiment.output_dir={tmp_path}", "experiment.name=r"])
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    save_config(config, run_dir / "config.yaml")
    runner = CliRunner()
    first = runner.invoke(app, ["status", str(run_dir)], terminal_width=160)
    assert first.exit_code == 0, first.output
    # base eval + IMM (generate, pairs, sft, eval, analysis, merge, eval, analysis) + vanilla (the same five)
    assert "0 of 14 stages done, 14 pending" in first.output
    events = IterationLoop(config, run_dir=run_dir).plan()
    base_eval = events[0]
    assert base_eval.link == "base/eval" and base_eval.status == "pending"
    loop = IterationLoop(config, run_dir=run_dir)
    loop.store.run(base_eval.kind, base_eval.fingerprint, lambda out: out.mkdir())
    second = runner.invoke(app, ["status", str(run_dir)], terminal_width=160)
    assert "1 of 14 stages done, 13 pending" in second.output


def test_status_of_a_folder_that_is_no_run_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["status", str(tmp_path)])
    assert result.exit_code == 2 and "has no config.yaml" in result.output
