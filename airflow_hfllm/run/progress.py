"""Progress lines in the task log: counts and rates only, never prompt or output text."""

from __future__ import annotations

import time


class Progress:
    """Logs rows done/total, rows/s, output tok/s, ETA and unsafe counts every ``every`` seconds.
    Counts and rates only: never prompt or output text."""

    def __init__(self, logger, total: int, done: int, every: float):
        self.log, self.total, self.done, self.every = logger, total, done, every
        self.started = self.last = time.monotonic()
        self.rows = self.tokens = 0
        self.unsafe_prompt = self.unsafe_output = self.errors = 0
        self.logged = None  # the counts of the last line

    def batch(self, rows: int, tokens: int) -> None:
        self.rows += rows
        self.tokens += tokens
        self.maybe_log()

    def skipped(self, rows: int) -> None:
        """Rows done without reaching the generator (blocked, bad); the generator counts the rest."""
        self.rows += rows

    def maybe_log(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.every:
            return
        counts = (self.rows, self.unsafe_prompt, self.unsafe_output, self.errors)
        # A batch and then its chunk's commit, or the last commit and then the run's end, would
        # otherwise log the same line twice.
        if counts == self.logged:
            return
        self.last, self.logged = now, counts
        elapsed = max(now - self.started, 1e-9)
        rate = self.rows / elapsed
        done = min(self.done + self.rows, self.total)
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        self.log.info(
            "progress: %d/%d rows (%.0f%%), %.1f rows/s, %.0f output tok/s, ETA %.0f s, "
            "unsafe prompts %d, unsafe outputs %d, errors %d",
            done, self.total, 100 * done / max(self.total, 1), rate, self.tokens / elapsed, eta,
            self.unsafe_prompt, self.unsafe_output, self.errors,
        )
