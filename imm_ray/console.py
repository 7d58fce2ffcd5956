"""What a person sees of a run: one line per event, and in a terminal a live bar for the stage in progress.

:class:`RunView` prints a header (what runs, where its logs go), a line per section (strategy, seed, iteration),
a line per finished stage (computed or reused, with its time) and, while a long stage runs, its progress: in a
terminal one redrawn bar (counts, ETA, the loss for SFT) above a status line (elapsed time, stages done); when
stdout is not a terminal (a log file, ``ray job logs``), plain lines only, one per event, progress at each
quarter of a stage. :func:`output_to` sends everything else the process writes to its stdout and stderr (Ray's
core worker, Ray Data's and Ray Train's loggers, library warnings and bars) into a log file, so the view stays
readable; ``--verbose`` leaves that output on the console, and the view then prints plain lines.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text

from imm_ray.progress import ProgressFn, Tick

DRIVER_LOG = "driver.log"  # what the driver process wrote to stdout/stderr besides the view
PLAIN_EVERY = 10.0  # plain mode: seconds between two progress lines of one stage (at least)


def clock(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``."""
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class _CountColumn(ProgressColumn):
    """``12/40 steps  loss 0.412`` (the count alone where the total is not known)."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "")
        if not unit:
            return Text("")
        total = f"/{int(task.total)}" if task.total is not None else ""
        note = task.fields.get("note", "")
        return Text(f"{int(task.completed)}{total} {unit}" + (f"  {note}" if note else ""))


class _EtaColumn(ProgressColumn):
    """``ETA 1:23`` once there is a rate to go by."""

    def render(self, task: Task) -> Text:
        left = task.time_remaining
        return Text("" if left is None or task.total is None else f"ETA {clock(left)}", style="cyan")


class RunView:
    """The console of one command: header, sections, one line per finished stage, live progress of the current one.

    ``live`` None: a live bar exactly when the console is a terminal and ``verbose`` is off (with ``--verbose``
    Ray's own output shares the console, which a redrawn bar would garble). Stages may run at once (the loop's
    concurrent chains, each in its own thread): each has its own bar in one live display.
    """

    def __init__(self, console: Console | None = None, *, verbose: bool = False, live: bool | None = None) -> None:
        self.console = console or Console()
        self.verbose = verbose
        self.live = (self.console.is_terminal and not self.console.is_dumb_terminal and not verbose
                     if live is None else live)
        self.started = time.monotonic()
        self.stages_total: int | None = None  # stages the run declares (set once planned)
        self.stages_seen = 0
        self.counts = {"computed": 0, "reused": 0}
        self._bar: Progress | None = None  # the running stages' bars, while one runs
        self._live: Live | None = None
        self._running = 0
        self._lock = threading.RLock()  # counts and the live display, shared by the threads of concurrent stages

    # ---- lines ---------------------------------------------------------------------------------------------
    def line(self, text: str, style: str | None = None) -> None:
        """One event: in plain mode prefixed by the elapsed time, never wrapped into a second line by rich."""
        prefix = "" if self.live else f"[{clock(time.monotonic() - self.started)}] "
        self._print(Text(prefix + text, style=style or ""))

    def _print(self, text: Text) -> None:
        # while a live bar is up, rich prints above it
        self.console.print(text, soft_wrap=not self.live, highlight=False)

    def header(self, what: str, logs: Path | None) -> None:
        """The first line: what runs, and where Ray's and the workers' output goes (shown too with --verbose).
        The clock starts here."""
        self.started = time.monotonic()
        if logs is not None:
            shown = Path(os.path.relpath(logs)) if Path(logs).resolve().is_relative_to(Path.cwd()) else logs
            what += f" · logs: {shown}/" + (" (also shown here)" if self.verbose else "")
        self.line(what, style="bold")

    def section(self, text: str) -> None:
        self.line(text, style="bold cyan")

    # ---- stages --------------------------------------------------------------------------------------------
    def reused(self, what: str, seconds: float | None) -> None:
        with self._lock:
            self.stages_seen += 1
            self.counts["reused"] += 1
        took = f" (computed in {seconds:.1f} s)" if seconds is not None else ""
        self.line(f"  = {what}: reused{took}", style="dim")

    @contextlib.contextmanager
    def stage(self, what: str) -> Iterator[ProgressFn]:
        """A stage being computed: yields the progress callback its work reports to; prints the outcome after."""
        with self._lock:
            self.stages_seen += 1
        started = time.monotonic()
        if not self.live:
            self.line(f"  > {what} ...")
        reporter = _StageReporter(self, what)
        try:
            with self._live_bar(what) as task:
                reporter.task = task
                yield reporter
        except BaseException:
            self.line(f"  x {what}: failed after {time.monotonic() - started:.1f} s", style="bold red")
            raise
        with self._lock:
            self.counts["computed"] += 1
        self.line(f"  + {what}: computed in {time.monotonic() - started:.1f} s", style="green")

    @contextlib.contextmanager
    def _live_bar(self, what: str) -> Iterator[object | None]:
        """The stage's bar above the run's status line, redrawn in place and removed when the stage ends; the
        display itself lasts while any stage runs."""
        if not self.live:
            yield None
            return
        with self._lock:
            if self._bar is None:
                self._bar = Progress(
                    SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=14), _CountColumn(),
                    TimeElapsedColumn(), _EtaColumn(), console=self.console,
                )
                self._live = Live(Group(self._bar, _Status(self)), console=self.console, transient=True,
                                  refresh_per_second=4, redirect_stdout=False, redirect_stderr=False)
                self._live.start()
            task = self._bar.add_task(escape(what), total=None, unit="")
            self._running += 1
        try:
            yield task
        finally:
            with self._lock:
                self._running -= 1
                if self._running == 0:  # the last bar is drawn once more as the display closes
                    self._live.stop()
                    self._bar, self._live = None, None
                else:
                    self._bar.remove_task(task)

    def status_text(self) -> str:
        total = f" of {self.stages_total}" if self.stages_total else ""
        return (f"  run {clock(time.monotonic() - self.started)} · stage {self.stages_seen}{total} · "
                f"{self.counts['computed']} computed, {self.counts['reused']} reused")

    def progress(self, reporter: _StageReporter, tick: Tick) -> None:
        bar = self._bar
        if bar is not None and reporter.task is not None:
            bar.update(reporter.task, completed=tick.done, total=tick.total, unit=tick.unit, note=tick.note)
            return
        if not tick.total:
            return
        # plain lines: at a newly reached quarter (none at the end: the stage's own line follows), and no sooner
        # than PLAIN_EVERY seconds after the stage's previous line, so a log stays short
        quarter = min(4, 4 * tick.done // tick.total)
        now = time.monotonic()
        if 0 < quarter < 4 and quarter > reporter.quarter and now - reporter.printed >= PLAIN_EVERY:
            reporter.quarter, reporter.printed = quarter, now
            note = f", {tick.note}" if tick.note else ""
            self.line(f"    {reporter.what}: {tick.done}/{tick.total} {tick.unit} ({100 * tick.done // tick.total}%)"
                      f"{note}")


class _Status:
    """The run's status line under the bar, rendered afresh at each refresh (so its clock runs)."""

    def __init__(self, view: RunView) -> None:
        self.view = view

    def __rich__(self) -> Text:
        return Text(self.view.status_text(), style="dim")


class _StageReporter:
    """The progress callback of one stage (what the stage code calls with its ticks)."""

    def __init__(self, view: RunView, what: str) -> None:
        self.view, self.what, self.task = view, what, None
        self.quarter, self.printed = 0, time.monotonic()  # plain mode: the last quarter shown, and when

    def __call__(self, tick: Tick) -> None:
        self.view.progress(self, tick)


# ---- the process's own stdout and stderr -----------------------------------------------------------------------
def _process_fd(stream: object) -> int | None:
    try:
        return stream.fileno()  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


@contextlib.contextmanager
def output_to(log_file: Path, console: Console) -> Iterator[None]:
    """While the block runs, file descriptors 1 and 2 of this process point at ``log_file``; ``console`` keeps
    writing to where stdout went before.

    At the descriptor level because much of what Ray prints does not pass through Python's ``sys.stdout``: the
    core worker's C++ log lines, and the output of the processes a local ``ray.init`` starts. Nothing is changed
    where stdout is not this process's descriptor 1 (an in-process test runner's capture).
    """
    if _process_fd(sys.stdout) != 1 or _process_fd(sys.stderr) != 2:
        yield
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    size = console.size
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
    target = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    previous = console.file
    console.file = terminal
    console.size = size  # rich measures the terminal through descriptors 0-2; 1 and 2 now hold a file
    os.dup2(target, 1)
    os.dup2(target, 2)
    os.close(target)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        console.file = previous
        terminal.close()
