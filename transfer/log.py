"""Progress people can follow, in a terminal and in a log file, and the `log.txt` of every run directory.

A terminal (stderr is a TTY) gets live bars: the run's examples with ETA and, when the caller says which
run of how many this is, the overall "run i of N" with ETA. Anything else (a log file, a batch job) gets
plain lines without control characters, flushed at once: one when a run starts, one at most every
`HEARTBEAT_S` seconds while it runs, and one when it finishes, with elapsed time and ETA. The same lines
go into the run directory's `log.txt` once the run has its first result (a run that fails before that
leaves nothing behind; transfer/rundir.py removes `log.txt` with the other run files).

`quiet_third_party()` is the one place where third-party chatter that tells the user nothing
(deprecation notices, weight-loading bars, TF32 API notices) is silenced; the CLI calls it once.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from transfer.rundir import LOG_FILE, PREDICTIONS_FILE

__all__ = ["LOG_FILE", "RunProgress", "count", "duration", "is_terminal", "line", "quiet_third_party", "track"]

HEARTBEAT_S = 60.0  # a long run still says something at least once a minute in a log file


def duration(seconds: float) -> str:
    """'42 s', '3 min 05 s', '1 h 07 min': short, and unambiguous in a log line."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def count(n: int, noun: str) -> str:
    """'1 example', '4 examples'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def is_terminal(stream: IO[str] | None = None) -> bool:
    """Live bars only on an interactive terminal; a file, pipe or dumb terminal gets plain lines."""
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty() and os.environ.get("TERM", "") != "dumb"
    except (AttributeError, ValueError):
        return False


def line(text: str, stream: IO[str] | None = None) -> None:
    """One timestamped progress line (the non-terminal format), flushed so a log file shows it at once."""
    stream = sys.stderr if stream is None else stream
    print(f"{time.strftime('%H:%M:%S')} {text}", file=stream, flush=True)


@dataclass
class _Sequence:
    """Durations of the runs computed so far in one sequence of N runs: the ETA of the rest is their mean."""

    total: int = 0
    seconds: list[float] = field(default_factory=list)

    def eta(self, index: int) -> float | None:
        if not self.seconds or index >= self.total:
            return None
        return sum(self.seconds) / len(self.seconds) * (self.total - index)


_SEQUENCE = _Sequence()


@dataclass
class RunProgress:
    """Progress of one run: `advance(n)` after each batch, `finish()` at the end (see `track`)."""

    label: str
    total: int
    done: int
    step: tuple[int, int] | None = None
    log_file: Path | None = None
    stream: IO[str] | None = None
    start: float = field(default_factory=time.time)
    _last_line: float = field(default_factory=time.time)
    _pending: list[str] = field(default_factory=list)
    _bar: object | None = None

    @property
    def name(self) -> str:
        return f"{self.label} [{self.step[0]}/{self.step[1]}]" if self.step else self.label

    def _eta_run(self, computed: int) -> float | None:
        elapsed = time.time() - self.start
        remaining = self.total - self.done
        return elapsed / computed * remaining if computed > 0 and remaining > 0 else None

    def _emit(self, text: str, to_stream: bool) -> None:
        if to_stream:
            line(text, self.stream)
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n"
        if self.log_file is None:
            return
        self._pending.append(stamped)
        if self.log_file.parent.is_dir() and (self.log_file.parent / PREDICTIONS_FILE).exists():
            with open(self.log_file, "a") as f:  # only once the run holds a result: see the module docstring
                f.writelines(self._pending)
            self._pending.clear()

    def begin(self, computed_before: int) -> None:
        verb = f"resumed ({computed_before} of {self.total} done before)" if computed_before else "started"
        self._emit(f"{self.name} {verb}: {count(self.total - self.done, 'example')} to run", not self._live)

    @property
    def _live(self) -> bool:
        return self._bar is not None

    def advance(self, n: int, computed: int) -> None:
        """n more examples done; `computed` counts those done by this process (the ETA's rate)."""
        self.done += n
        if self._bar is not None:
            self._bar.advance(n)  # type: ignore[attr-defined]
            return
        now = time.time()
        if now - self._last_line >= HEARTBEAT_S and self.done < self.total:
            eta = self._eta_run(computed)
            tail = f", ETA {duration(eta)}" if eta is not None else ""
            self._emit(f"{self.name} {self.done}/{self.total} examples, {duration(now - self.start)}{tail}", True)
            self._last_line = now

    def finish(self) -> None:
        seconds = time.time() - self.start
        text = f"{self.name} finished: {count(self.total, 'example')}, {duration(seconds)}"
        if self.step:
            index, total = self.step
            if _SEQUENCE.total != total or index == 1:
                _SEQUENCE.total, _SEQUENCE.seconds = total, []
            _SEQUENCE.seconds.append(seconds)
            eta = _SEQUENCE.eta(index)
            if eta is not None:
                text += f"; ETA {duration(eta)} for {count(total - index, 'more run')}"
        self._emit(text, True)

    def failed(self, error: BaseException) -> None:
        message = " ".join(str(error).split()) or type(error).__name__
        self._emit(f"{self.name} failed after {self.done}/{self.total} examples: {message}", False)


@contextmanager
def track(label: str, total: int, done: int = 0, step: tuple[int, int] | None = None,
          log_file: Path | None = None, stream: IO[str] | None = None) -> Iterator[RunProgress]:
    """Show one run's progress (bars on a terminal, lines elsewhere) and keep its lines in `log_file`."""
    progress = RunProgress(label, total, done, step, log_file, stream)
    with ExitStack() as bars:
        if is_terminal(stream):
            progress._bar = _terminal_bars(bars, progress.name, total, done, step, stream)
        progress.begin(done)
        try:
            yield progress
        except BaseException as error:
            progress.failed(error)
            raise
    progress._bar = None
    progress.finish()


def _terminal_bars(stack: ExitStack, name: str, total: int, done: int, step: tuple[int, int] | None,
                   stream: IO[str] | None) -> object:
    """rich bars for one run (and the overall run count), closed with `stack`; returns what `advance`s them."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    bars = stack.enter_context(Progress(*columns, console=Console(file=stream or sys.stderr), transient=True))
    if step:
        overall = bars.add_task(f"runs {step[0] - 1}/{step[1]} done", total=step[1], completed=step[0] - 1)
    run_bar = bars.add_task(name, total=total, completed=done)

    class _Bar:  # the run's bar and the overall bar advance together
        def advance(self, n: int) -> None:
            bars.advance(run_bar, n)
            if step:
                bars.advance(overall, n / max(total, 1))

    return _Bar()


def quiet_third_party(terminal: bool | None = None, load_transformers: bool = True) -> None:
    """Silence third-party output that says nothing to the user, once, before anything is imported or run.

    Kept: every error, and the hub's download bars on a terminal (a 7B download deserves a bar).
    Dropped: gymnasium's environment-version deprecation notices, torch's TF32 API notices,
    transformers' info/warning logs and its per-load "Loading weights" bars.
    """
    terminal = is_terminal() if terminal is None else terminal
    if load_transformers:
        try:  # gymnasium puts its own "always show deprecations" filter first when imported: import it first
            import gymnasium.logger  # noqa: F401
        except ImportError:
            pass
    warnings.filterwarnings("ignore", category=DeprecationWarning, message=r"(\x1b\[\d+m)?WARN: ")  # gymnasium
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"gymnasium(\.|$)")
    warnings.filterwarnings("ignore", category=UserWarning, message=r".*TF32")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|huggingface_hub)(\.|$)")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")  # e.g. its five "retrying" lines when offline
    if not terminal:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not load_transformers:
        return
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # the "Loading weights" bars (it also turns off the hub's bars ...)
    if terminal and os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") != "1":
        from huggingface_hub.utils import enable_progress_bars

        enable_progress_bars()  # ... which a terminal keeps for downloads
