"""Safety checks overlapped with the fast engine's decoding.

Checked one after the other, a batch pays for its prompt checks, then generation, then its output
checks. But decoding leaves the GPU's compute mostly idle (a step is bound by reading weights and KV
cache), while a checker's forward pass is compute-bound: the two share a GPU well. Here one worker
thread runs the checkers on a CUDA stream of its own: prompt checks a few batches ahead of the engine
(a row is handed to the engine once its prompt passed), output checks as rows finish. The engine's
stream gets the higher priority, so decoding is not slowed much by the checker.

Nothing about the results changes: the same checkers judge the same texts (in other batches; the
checkers' verdicts do not depend on batching), an unsafe prompt is never generated, and a row is
only done once its output was judged.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

from airflow_hfllm.engine.generate import Completion, Request
from airflow_hfllm.safety.base import Judgement, SafetyChecker, judge

log = logging.getLogger(__name__)


@dataclass
class Row:
    """A row for :class:`CheckedGeneration`: ``build()`` makes its request once its prompt is judged
    safe (raising :class:`~airflow_hfllm.engine.prompts.RowError` for a row that cannot run)."""

    tag: Any
    prompt: str
    build: Callable[[], Request]
    key: Any


@dataclass
class Result:
    """What happened to a row: its prompt's judgement, its completion (``None`` when it was not
    generated), its output's judgement, or the ``error`` that stopped it before generation."""

    prompt: Judgement | None = None
    completion: Completion | None = None
    output: Judgement | None = None
    error: str | None = None


class CheckedGeneration:
    """Rows through prompt checks, the fast engine and output checks, overlapped (module docstring).

    :param engine: a :class:`~airflow_hfllm.engine.fast.FastEngine` (or the vision one).
    :param checkers: loaded safety checkers (a text is unsafe if any says so).
    :param batch_rows: texts per checker call.
    :param ahead_rows: rows whose prompts are checked (or being checked) ahead of the engine.
    """

    def __init__(self, engine, checkers: Sequence[SafetyChecker], *, batch_rows: int = 64,
                 ahead_rows: int = 512):
        self.engine, self.checkers = engine, list(checkers)
        self.batch_rows, self.ahead_rows = batch_rows, ahead_rows
        self.check_seconds = 0.0  # checker time on the worker (overlapped with decoding)
        self._side = None

    def _judge(self, texts: list[str], kind: str, context: list[str] | None) -> list[Judgement]:
        """On the worker thread, on the checker's CUDA stream."""
        import torch

        started = time.monotonic()
        if self._side is None:
            result = judge(self.checkers, texts, kind, context)
        else:
            with torch.cuda.stream(self._side):
                result = judge(self.checkers, texts, kind, context)
                self._side.synchronize()
        self.check_seconds += time.monotonic() - started
        return result

    def stream(self, rows: Iterable[Row], seed: int | None = None) -> Iterator[tuple[Any, Result]]:
        """``(tag, result)`` for every row, as rows are done (not in input order)."""
        import torch

        cuda = self.engine.device.type == "cuda"
        if cuda:
            # The engine's stream outranks the checker's: decoding goes first when both have work.
            low, high = torch.cuda.Stream.priority_range()
            self._side = torch.cuda.Stream(self.engine.device, priority=low)
            self.engine.cuda_stream = torch.cuda.Stream(self.engine.device, priority=high)
        feed = _Feed(self, iter(rows))
        outputs: list[tuple[Any, Row, Completion]] = []
        checking: deque[tuple[list, Future]] = deque()
        with ThreadPoolExecutor(1, thread_name_prefix="hfllm-safety") as worker:
            feed.worker = worker

            def submit_outputs() -> None:
                batch = outputs[:]
                outputs.clear()
                checking.append((batch, worker.submit(self._judge, [c.text for _, _, c in batch], "output",
                                                      [row.prompt for _, row, _ in batch])))

            def done_outputs(wait: bool) -> Iterator[tuple[Any, Result]]:
                while checking and (wait or checking[0][1].done()):
                    batch, future = checking.popleft()
                    for (tag, row, completion), judgement in zip(batch, future.result()):
                        yield tag, Result(feed.judged.pop(tag), completion, judgement)

            try:
                for tag, completion in self.engine.stream(feed, seed=seed):
                    row = feed.running.pop(tag)
                    if completion.finish_reason == "error" or completion.text is None:
                        yield tag, Result(feed.judged.pop(tag), completion)
                    else:
                        outputs.append((tag, row, completion))
                        if len(outputs) >= self.batch_rows:
                            submit_outputs()
                    yield from feed.take_early()
                    yield from done_outputs(wait=False)
                yield from feed.take_early()
                if outputs:
                    submit_outputs()
                yield from done_outputs(wait=True)
            finally:
                for _, future in list(checking) + list(feed.pending):
                    future.cancel()
                self.engine.cuda_stream = None


class _Feed:
    """The engine's source of rows: rows whose prompts were judged safe, in input order, without
    waiting unless the engine has nothing else to do."""

    def __init__(self, owner: CheckedGeneration, rows: Iterator[Row]):
        self.owner, self.rows = owner, rows
        self.worker: ThreadPoolExecutor | None = None
        self.pending: deque[tuple[list[Row], Future]] = deque()
        self.in_flight = 0
        self.exhausted = False
        self.judged: dict[Any, Judgement] = {}  # tag -> prompt judgement, until the row is done
        self.running: dict[Any, Row] = {}  # handed to the engine
        self._early: list[tuple[Any, Result]] = []  # rows that ended before generation

    def take_early(self) -> list[tuple[Any, Result]]:
        early, self._early = self._early, []
        return early

    def _top_up(self) -> None:
        owner = self.owner
        while not self.exhausted and self.in_flight < owner.ahead_rows:
            batch = []
            for row in self.rows:
                batch.append(row)
                if len(batch) == owner.batch_rows:
                    break
            else:
                self.exhausted = True
            if batch:
                self.pending.append((batch, self.worker.submit(owner._judge, [r.prompt for r in batch],
                                                               "prompt", None)))
                self.in_flight += len(batch)

    def poll(self, n: int, block: bool) -> list | None:
        """Up to ``n`` engine items ``(tag, request, key)``; ``[]`` when none is ready yet, ``None``
        once every row was handed out. Blocks only when ``block`` and nothing is ready."""
        from airflow_hfllm.engine.prompts import RowError

        self._top_up()
        out: list = []
        while self.pending and len(out) < n:
            batch, future = self.pending[0]
            if not future.done() and (out or not block):
                break
            self.pending.popleft()
            self.in_flight -= len(batch)
            for row, judgement in zip(batch, future.result()):
                if judgement.error is not None or judgement.safe is False:
                    self._early.append((row.tag, Result(judgement)))
                    continue
                try:
                    request = row.build()
                except RowError as exc:
                    self._early.append((row.tag, Result(judgement, error=str(exc))))
                    continue
                self.judged[row.tag] = judgement
                self.running[row.tag] = row
                out.append((row.tag, request, row.key))
            self._top_up()
            if out:
                block = False
        if not out and not self.pending and self.exhausted:
            return None
        return out
