"""The progress channel: the stage callback of the thread, and the SFT step file the driver follows."""

from __future__ import annotations

import time

from imm_ray.progress import Tick, append_step, current, follow_steps, reporting, step_tick


def test_reporting_sets_the_callback_for_the_block_only():
    seen: list[Tick] = []
    assert current() is None
    with reporting(seen.append):
        current()(Tick(1, 2, "samples"))
    assert current() is None and seen == [Tick(1, 2, "samples")]


def test_the_driver_follows_the_steps_rank_0_appends(tmp_path):
    path = tmp_path / "run" / "steps.jsonl"
    seen: list[Tick] = []
    with follow_steps(path, seen.append, every=0.05):
        time.sleep(0.1)  # the file does not exist yet: nothing to report, no error
        append_step(path, 1, 3, 1.23456)
        time.sleep(0.3)
        assert seen == [Tick(1, 3, "steps", "loss 1.235")]
        append_step(path, 2, 3, 0.5)
        with open(path, "a") as handle:
            handle.write('{"step": 3, "tot')  # a line still being written is not read yet
        time.sleep(0.3)
        assert [t.done for t in seen] == [1, 2]
        with open(path, "a") as handle:
            handle.write('al": 3, "loss": 0.25}\n')
    assert [t.done for t in seen] == [1, 2, 3]  # the last read happens when the block ends


def test_a_line_that_is_not_a_step_is_skipped():
    assert step_tick("not json\n") is None and step_tick('{"step": 1}\n') is None


def test_nobody_watching_costs_nothing(tmp_path):
    with follow_steps(tmp_path / "steps.jsonl", None):
        pass
    with follow_steps(None, print):
        pass
