"""What a person sees while a job runs: one line per stage with a live bar and ETA, the key numbers when it ends,
and everything else in a log file.

Ray, Ray Data, Ray Train and DeepSpeed write thousands of lines (a progress bar per operator, every
TrainingReport, op builds, warnings). `capture_output` points the process's stdout/stderr *file descriptors* at a
log file, so C++ logs and the worker output Ray forwards to the driver land there too, and keeps a handle on the
terminal for `stage` bars and `say` lines. Workers report progress with `advance`/`set_progress`: a named Ray actor
keeps the counts and the driver's bar polls it, so bars also move for work running on other nodes.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, TextIO

from tqdm import tqdm

BOARD = "memory3-progress"
_terminal: TextIO | None = None  # the terminal while output is captured
_active: "Stage | None" = None
_board_handle = None


def terminal() -> TextIO:
    return _terminal or sys.stdout


def say(text: str) -> None:
    """A line for the person at the terminal (also kept in the log)."""
    print(text, file=terminal(), flush=True)
    if _terminal is not None:
        print(text, flush=True)


@contextlib.contextmanager
def capture_output(log_path: str | Path, verbose: bool = False) -> Iterator[Path]:
    """Send fd 1 and 2 to `log_path` (appending) for the duration; `verbose` leaves them on the terminal."""
    global _terminal
    log_path = Path(log_path)
    if verbose or _terminal is not None:
        yield log_path
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    try:
        yield log_path
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        _terminal.close()
        _terminal = None


# ------------------------------------------------------------------ progress counts from anywhere in the cluster
def _board(create: bool):
    """The named counter actor: the driver creates it, workers look it up (None when no driver bar is open)."""
    global _board_handle
    if _board_handle is None:
        import ray

        if not ray.is_initialized():
            return None

        @ray.remote(num_cpus=0)
        class ProgressBoard:
            def __init__(self):
                self.counts: dict[str, float] = {}

            def add(self, key: str, n: float) -> None:
                self.counts[key] = self.counts.get(key, 0) + n

            def set(self, key: str, value: float) -> None:
                self.counts[key] = value

            def read(self, key: str) -> float:
                return self.counts.get(key, 0)

        try:
            _board_handle = (ProgressBoard.options(name=BOARD, get_if_exists=True).remote() if create
                             else ray.get_actor(BOARD))
        except ValueError:
            return None
    return _board_handle


def advance(key: str, n: float = 1) -> None:
    """Count `n` units of `key` done (fire and forget; a no-op when nobody watches)."""
    board = _board(create=False)
    if board is not None:
        board.add.remote(key, n)


def set_progress(key: str, value: float) -> None:
    board = _board(create=False)
    if board is not None:
        board.set.remote(key, value)


# ------------------------------------------------------------------ stages
class Stage:
    """One terminal line: a tqdm bar that follows a board key (or `update` calls), then the stage's summary."""

    FORMATS = {"time": "{desc}: [{elapsed}]{postfix}",  # nothing to count
               "count": "{desc}: {n_fmt} {unit} [{elapsed}, {rate_fmt}]{postfix}",  # unknown total
               "bar": "{desc}: {percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}]{postfix}"}

    def __init__(self, title: str):
        # a terminal redraws the line in place; a pipe or CI log gets a new line per redraw, so redraw rarely
        interactive = terminal().isatty()
        self.bar = tqdm(desc=title, total=None, file=terminal(), unit="", mininterval=1.0 if interactive else 60.0,
                        dynamic_ncols=True, bar_format=self.FORMATS["time"])
        self.key: str | None = None
        self.started = time.perf_counter()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    def follow(self, key: str | None, total: float | None, unit: str = "") -> None:
        """Count `unit`s out of `total` from now on: the board's count of `key`, or (key None) `update` calls."""
        self.key = key
        self.bar.reset(total=total)
        self.bar.unit = unit
        self.bar.bar_format = self.FORMATS["bar" if total else "count"]
        if key is None:
            return
        board = _board(create=True)
        if board is None:
            return
        import ray

        ray.get(board.set.remote(key, 0))
        if self._poller is None:
            self._poller = threading.Thread(target=self._poll, args=(board,), daemon=True)
            self._poller.start()

    def _poll(self, board) -> None:
        import ray

        while not self._stop.wait(1.0):
            try:
                n = ray.get(board.read.remote(self.key), timeout=5)
            except Exception:  # the cluster is going away: the bar just stops moving
                return
            n = min(n, self.bar.total or n)
            if n > self.bar.n:
                self.bar.update(n - self.bar.n)  # redraws no more often than mininterval

    def update(self, n: float = 1) -> None:
        self.bar.update(n)

    def done(self, summary: str) -> None:
        """The key numbers of the stage, shown at the end of its line."""
        self.bar.set_postfix_str(summary, refresh=False)

    def close(self, finished: bool = True) -> float:
        """Ends the line: a finished stage's bar is full; one stopped by an error or Ctrl-C shows where it stopped."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=5)
        if not finished:
            self.bar.set_postfix_str("stopped", refresh=False)
        elif self.bar.total:
            self.bar.n = self.bar.total
        seconds = time.perf_counter() - self.started
        self.bar.close()
        return seconds


@contextlib.contextmanager
def stage(title: str) -> Iterator[Stage]:
    """A stage line. Nested calls (a job run by the quickstart) join the open line instead of starting another."""
    global _active
    if _active is not None:
        yield _active
        return
    _active = Stage(title)
    finished = False
    try:
        yield _active
        finished = True
    finally:
        seconds = _active.close(finished)
        _active = None
        if _terminal is not None:  # the log gets the stage's end too
            print(f"[stage] {title}: {seconds:.1f}s{'' if finished else ', stopped'}", flush=True)
