"""The run's console: plain lines off a terminal (one per event, no bar redraws), a live bar on one, and the
process's own stdout/stderr sent to a log file while the console keeps the terminal."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path

from rich.console import Console

from imm_ray import console as console_module
from imm_ray.console import RunView
from imm_ray.progress import Tick


def _drive(view: RunView) -> None:
    """A header, a section, one reused stage, one computed stage with 8 steps, one failed stage."""
    view.stages_total = 3
    view.header("imm-ray run demo · IMM · seed 0 · 1 iteration", Path("runs/demo/logs"))
    view.section("IMM · seed 0 · iteration 0")
    view.reused("evaluate toy", 12.25)
    with view.stage("SFT on 52 pairs") as progress:
        for step in range(1, 9):
            progress(Tick(step, 8, "steps", f"loss {1 / step:.3f}"))
    try:
        with view.stage("merge"):
            raise RuntimeError("boom")
    except RuntimeError:
        pass


def test_plain_mode_prints_one_line_per_event_and_no_redraws(monkeypatch):
    monkeypatch.setattr(console_module, "PLAIN_EVERY", 0.0)  # a line at every quarter, however fast
    out = io.StringIO()
    _drive(RunView(Console(file=out, force_terminal=False, width=60)))
    text = out.getvalue()
    assert "\x1b" not in text and "\r" not in text  # no ANSI codes, no bar redrawn in place
    lines = text.splitlines()
    events = ["imm-ray run demo", "IMM · seed 0 · iteration 0", "= evaluate toy: reused (computed in 12.2 s)",
              "> SFT on 52 pairs ...", "SFT on 52 pairs: 2/8 steps (25%), loss 0.500", "4/8 steps (50%)",
              "6/8 steps (75%)", "+ SFT on 52 pairs: computed in", "> merge ...", "x merge: failed after"]
    assert len(lines) == len(events)  # nothing wrapped onto a second line at 60 columns either
    for line, event in zip(lines, events):
        assert line.startswith("[0:00] ") and event in line
    assert "runs/demo/logs/" in lines[0]  # the first line says where Ray's output goes


def test_plain_progress_lines_are_at_least_ten_seconds_apart():
    out = io.StringIO()
    _drive(RunView(Console(file=out, force_terminal=False, width=60)))
    assert "steps (" not in out.getvalue()  # eight steps in a blink: the stage's own two lines only
    assert len(out.getvalue().splitlines()) == 7


def test_live_mode_draws_a_bar_and_keeps_the_finished_lines():
    out = io.StringIO()
    view = RunView(Console(file=out, force_terminal=True, width=80))
    assert view.live
    _drive(view)
    text = out.getvalue()
    assert "━" in text and "\x1b[" in text  # a bar, redrawn with cursor controls
    assert "+ SFT on 52 pairs: computed in" in text and "x merge: failed after" in text
    assert "stage 2 of 3" in text  # the status line under the bar


def test_verbose_prints_plain_lines_even_on_a_terminal():
    view = RunView(Console(file=io.StringIO(), force_terminal=True), verbose=True)
    assert not view.live  # Ray's own output shares the console: no bar to garble


def test_output_to_sends_the_process_output_to_the_log_and_keeps_the_console(tmp_path):
    script = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        from rich.console import Console
        from imm_ray.console import output_to
        console = Console(force_terminal=False)
        with output_to(Path({str(tmp_path / "logs" / "driver.log")!r}), console):
            console.print("shown on the console")
            print("python print")
            os.write(1, b"fd one\\n")
            os.write(2, b"fd two\\n")
        print("after the block")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["shown on the console", "after the block"]
    assert done.stderr == ""
    log = (tmp_path / "logs" / "driver.log").read_text().splitlines()
    assert log == ["python print", "fd one", "fd two"]


def test_stages_running_at_once_share_one_live_display():
    """The loop's concurrent chains compute stages in threads at once: one display holds a bar per stage (rich
    allows one live display at a time), and each stage still prints its outcome."""
    import threading

    out = io.StringIO()
    view = RunView(Console(file=out, force_terminal=True, width=100))
    both_running = threading.Barrier(2, timeout=10)

    def stage(what: str) -> None:
        with view.stage(what) as progress:
            progress(Tick(1, 2, "samples"))
            both_running.wait()
            progress(Tick(2, 2, "samples"))

    threads = [threading.Thread(target=stage, args=(what,)) for what in ("seed 0 · generate", "seed 1 · evaluate")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    text = out.getvalue()
    assert "+ seed 0 · generate: computed in" in text and "+ seed 1 · evaluate: computed in" in text
    assert view.counts["computed"] == 2 and view._live is None  # the display is gone with the last stage
