"""What a person at the terminal sees of a command: a start block, one live progress line, an
end block; the command's log, Ray's and Lance's own output go to a log file (path printed).

Verbosity: ``quiet`` prints only the summary; ``normal`` (the default) the blocks and the
progress line; ``verbose`` also lets Ray, Lance and the job's INFO log through to the terminal
as they come (nothing is captured).

While a command runs (not verbose) the process's stderr (file descriptor 2) points at the log
file: Ray's C++ core worker, its Python loggers, warnings and the Ray processes started from
here write there, whatever their logging setup; the job's own warnings are still shown.

Two lines of a healthy run land only in the log file, on purpose: Ray's core worker ERROR
"constructor arguments in the object store and max_restarts > 0" (Ray Data always puts an
actor stage's functions in the object store, ``MapOperator._map_transformer_ref``, and the
driver holds that reference for the whole run, so a restarted actor finds it), and Ray's
token-authentication notice for the local cluster it starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, TextIO

Verbosity = Literal["quiet", "normal", "verbose"]
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TTY_REDRAW_S = 0.5  # a bar on a terminal redraws this often
PIPED_LINE_S = 10.0  # piped output: one plain progress line this often
BAR_WIDTH = 24
# Known-harmless warnings, filtered on purpose, each for the reason given.
HARMLESS_WARNINGS = (
    # Lance warns when a process forks after importing it; Ray starts its processes with
    # fork + exec (a new program, no Lance state shared), and the job uses no multiprocessing.
    "lance is not fork-safe",
)


@dataclass
class Tally:
    """What the progress line shows."""

    rows: int = 0  # rows done: embedded + rejected + unchanged
    tokens: int = 0
    rejected: int = 0


class Console:
    """The terminal side of one command (see the module docstring)."""

    def __init__(self, verbosity: Verbosity, log_path: str, *, stream: TextIO | None = None,
                 piped_line_s: float = PIPED_LINE_S) -> None:
        self.verbosity, self.log_path = verbosity, log_path
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.piped_line_s = piped_line_s
        self.tally = Tally()
        self._total: tuple[int, bool] | None = None  # (rows, exact)
        self._started = time.monotonic()  # the command's start: the summary's clock too
        self._progress_from = self._started  # when rows started to be read (for the ETA)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._bar_shown = False

    # --- blocks ---------------------------------------------------------------------------

    def say(self, *lines: str) -> None:
        """Lines of the start or end block (not in quiet mode)."""
        if self.verbosity != "quiet":
            self._write("\n".join(lines) + "\n")

    def result(self, *lines: str) -> None:
        """The command's result (the summary): printed in every mode, once."""
        self._write("\n".join(lines) + "\n")

    def _write(self, text: str) -> None:
        with self._lock:
            if self._bar_shown:  # the bar's line is replaced by the text, then redrawn
                self.stream.write("\r\033[K")
            self.stream.write(text)
            self.stream.flush()
            if self._bar_shown:
                self._draw_locked()

    # --- the progress line ------------------------------------------------------------------

    def start_progress(self, total_rows: int, exact: bool) -> None:
        """Show the progress line from now on (rows done out of ``total_rows``)."""
        self._total, self._progress_from = (total_rows, exact), time.monotonic()
        if self.verbosity == "quiet":
            return
        self._ticker = threading.Thread(target=self._tick, name="embedjob-progress",
                                        daemon=True)
        self._ticker.start()

    def update(self, rows: int, tokens: int, rejected: int) -> None:
        """The counts so far (called as results arrive)."""
        self.tally = Tally(rows=rows, tokens=tokens, rejected=rejected)

    def stop_progress(self) -> None:
        """Stop the line; its last state stays on the terminal."""
        if self._ticker is None:
            return
        self._stop.set()
        self._ticker.join()
        self._ticker = None
        with self._lock:
            if self.tty and self._bar_shown:
                self._draw_locked()
                self.stream.write("\n")
            elif not self.tty:
                self.stream.write(self.line() + "\n")
            self.stream.flush()
            self._bar_shown = False

    def _tick(self) -> None:
        every = TTY_REDRAW_S if self.tty else self.piped_line_s
        while not self._stop.wait(every):
            with self._lock:
                if self.tty:
                    self._bar_shown = True
                    self._draw_locked()
                else:
                    self.stream.write(self.line() + "\n")
                self.stream.flush()

    def _draw_locked(self) -> None:
        self.stream.write("\r\033[K" + self.line(bar=True))

    def line(self, *, bar: bool = False) -> str:
        """``[####----] 1,234/~10,000 rows 12% | 3,456 tokens/s | 0 rejected | 0:01:23 elapsed,
        ETA 0:09:10``."""
        total, exact = self._total or (0, True)
        now = time.monotonic()
        tally, elapsed, reading = self.tally, now - self._started, now - self._progress_from
        mark = "" if exact else "~"
        fraction = min(tally.rows / total, 1.0) if total else 0.0
        head = f"[{'#' * round(fraction * BAR_WIDTH):-<{BAR_WIDTH}}] " if bar else ""
        # the rows' own pace (model loading and Ray's start are behind us once rows come)
        eta = _clock(reading / fraction - reading) if 0 < fraction < 1 else "-"
        if fraction >= 1:
            eta = "0:00:00"
        return (f"{head}{tally.rows:,}/{mark}{total:,} rows {fraction:4.0%} | "
                f"{tally.tokens / max(elapsed, 1e-9):,.0f} tokens/s | {tally.rejected:,} "
                f"rejected | {_clock(elapsed)} elapsed, ETA {eta}")

    # --- the log file -----------------------------------------------------------------------

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Send stderr (fd 2: Ray, Lance, warnings) to the log file unless verbose."""
        import warnings

        for message in HARMLESS_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        if self.verbosity == "verbose":
            yield
            return
        sys.stderr.flush()
        saved = os.dup(2)
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        terminal = os.fdopen(os.dup(saved), "w", buffering=1, encoding="utf-8")
        handlers = _point_stderr_handlers_at(terminal)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            for handler, stream in handlers:
                handler.setStream(stream)
            terminal.close()


def _point_stderr_handlers_at(terminal: TextIO) -> list[tuple[logging.StreamHandler, TextIO]]:
    """The job's terminal log handler writes to the real terminal while fd 2 is captured."""
    moved = []
    for handler in logging.getLogger().handlers:
        if getattr(handler, "embedjob", "") == "terminal":
            moved.append((handler, handler.setStream(terminal)))
    return moved


def setup_logging(log_path: str, verbosity: Verbosity) -> None:
    """Everything (INFO and up) to the log file; to the terminal: the job's warnings (INFO
    with ``verbose``, nothing but errors with ``quiet``)."""
    to_file = logging.FileHandler(log_path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter(LOG_FORMAT))
    to_terminal = logging.StreamHandler(sys.stderr)
    to_terminal.setFormatter(logging.Formatter(
        LOG_FORMAT if verbosity == "verbose" else "embedjob: %(levelname)s: %(message)s"))
    to_terminal.setLevel({"quiet": logging.ERROR, "normal": logging.WARNING,
                          "verbose": logging.INFO}[verbosity])
    if verbosity != "verbose":  # only the job's own records; Ray's go to the file
        to_terminal.addFilter(logging.Filter("embedjob"))
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for old in [h for h in root.handlers if getattr(h, "embedjob", "")]:  # an earlier main()
        root.removeHandler(old)
        old.close()
    to_file.embedjob, to_terminal.embedjob = "file", "terminal"
    root.addHandler(to_file)
    root.addHandler(to_terminal)


def _clock(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class RunView:
    """A run's start block, progress line and end block on a :class:`Console` (the
    ``driver.run.Reporter`` hooks)."""

    def __init__(self, console: Console, command: str = "embed") -> None:
        self.console, self.command = console, command
        self.forward_worker_logs = console.verbosity == "verbose"
        self._progress_bars: bool | None = None

    def planned(self, plan) -> None:
        """A dry run: the start block, and that nothing ran."""
        self.describe(plan)
        limit = plan.config.limit
        self.console.result(
            f"dry run: every check passed; no model loaded, nothing written "
            f"(drop --dry-run to embed{f' the first {limit:,} rows' if limit else ''})")

    def started(self, plan) -> None:
        """The start block, then the progress line."""
        total, exact = self.describe(plan)
        if not self.forward_worker_logs:  # Ray Data's own progress: the line replaces it
            from ray.data import DataContext

            context = DataContext.get_current()
            self._progress_bars, context.enable_progress_bars = context.enable_progress_bars, False
        self.console.start_progress(total, exact)

    def describe(self, plan) -> tuple[int, bool]:
        """The start block (input, model and stamp, output, resume state); returns the rows
        to read and whether that count is exact."""
        from embedjob.stages.read import estimate_rows

        cfg = plan.config
        sizes = {f: int(fp.split(":")[0]) for f, fp in plan.fingerprints.items() if ":" in fp}
        total, exact = estimate_rows(plan.units, plan.read, sizes)
        if cfg.limit is not None and (total >= cfg.limit or plan.read.row_caps):
            total, exact = cfg.limit, True
        if plan.resumed:
            state = (f"resuming an interrupted run: {len(plan.resumed.done)} of "
                     f"{len(plan.fingerprints)} input units already done")
        else:
            state = {"create": "new table", "overwrite": "replacing the table",
                     "append": "appending"}.get(cfg.mode, cfg.mode)
        self.console.say(
            f"embedjob {self.command}: {len(plan.units):,} {plan.read.format} input unit(s), "
            f"{'' if exact else '~'}{total:,} rows to read",
            f"  model   {plan.model.source} (task {plan.task or 'none'}, dims "
            f"{','.join(map(str, plan.dims))}, {cfg.vector_dtype}, weights "
            f"{plan.model.fingerprint[:12]})",
            f"  output  {cfg.output} ({state})",
            *([f"  limit   the first {cfg.limit:,} rows only (stamped: embedjob.limit)"]
              if cfg.limit else []),
            f"  log     {self.console.log_path}",
        )
        return total, exact

    def progress(self, counts) -> None:
        self.console.update(rows=counts.rows_embedded + counts.rows_rejected
                            + counts.rows_unchanged, tokens=counts.tokens,
                            rejected=counts.rows_rejected)

    def finished(self) -> None:
        self.console.stop_progress()
        if self._progress_bars is not None:
            from ray.data import DataContext

            DataContext.get_current().enable_progress_bars = self._progress_bars

    def ended(self, summary, how_to_read: str) -> None:
        """The end block: the summary (once), where the rejected rows are, how to read."""
        self.console.result(summary.line())
        if summary.rows_rejected:
            self.console.say(f"rejected: {summary.rows_rejected:,} rows, with their reasons, "
                             f"in {summary.rejected_output} (embedjob rejected "
                             f"{summary.output})")
        self.console.say(how_to_read, f"log: {self.console.log_path}")
