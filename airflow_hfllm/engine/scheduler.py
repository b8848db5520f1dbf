"""The fast engine's scheduling, apart from its tensors (as nano-vllm splits scheduler and model runner):
which rows wait, which slot each running row holds, and which rows are prefilled next."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from airflow_hfllm.engine.generate import Completion, Request

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


def tokens(request: Request) -> int:
    """The KV positions a row takes: its prompt and every token it may generate."""
    return len(request.input_ids) + request.max_new_tokens


@dataclass(eq=False)
class Row:
    """One request through the engine; ``tag`` and ``key`` (its id, which its samples depend on) are the
    caller's."""

    tag: Any
    request: Request
    key: Any
    block: int = 0  # which block of arrivals it belongs to; see Scheduler
    status: str = WAITING
    blocks: list[int] = field(default_factory=list)  # its KV blocks while it runs in a paged cache


class Scheduler:
    """Rows pulled lazily from ``(tag, request, key)`` items into a waiting window, and the slots they decode in.

    Up to ``lookahead`` rows wait (more once there are more slots), admitted longest first within each
    block of ``lookahead`` arrivals: a row waits for its own block and those before it only, so the
    caller's chunks finish in order (otherwise the short rows of every chunk would wait behind longer rows
    arriving later, and no chunk could be written before the stream's end).

    :param enqueue: called as a row enters the window (the vision engine starts decoding its images).
    :param prepare: called before a row is prefilled; returns an error that ends the row without a slot
        (the vision engine waits for its images here).
    :param cost: the tokens a row's prefill computes (its prompt, less a shared prefix already computed).
    """

    def __init__(self, items: Iterable[tuple[Any, Request, Any]], lookahead: int,
                 enqueue: Callable[[Row], None] = lambda row: None,
                 prepare: Callable[[Row], str | None] = lambda row: None,
                 cost: Callable[[Request], int] = lambda request: len(request.input_ids)):
        self.items = iter(items)
        self.cost = cost
        self.lookahead = lookahead
        self.enqueue, self.prepare = enqueue, prepare
        self.waiting: list[Row] = []
        self.slots: list[Row | None] = []  # the row in each slot; none until the KV cache is allocated
        self.max_len = 0  # tokens per slot
        self.pool = None  # a paged cache's free blocks (engine/kv_cache.py BlockPool)
        self.ended: list[tuple[Any, Completion]] = []  # rows that ended without decoding
        self.arrived = 0
        self.exhausted = False

    def refill(self) -> None:
        while not self.exhausted and len(self.waiting) < max(self.lookahead, 2 * len(self.slots)):
            item = next(self.items, None)
            if item is None:
                self.exhausted = True
                return
            row = Row(*item, block=self.arrived // self.lookahead)
            self.arrived += 1
            self.waiting.append(row)
            self.enqueue(row)

    @property
    def running(self) -> bool:
        return any(row is not None for row in self.slots)

    def fits(self, request: Request) -> bool:
        return tokens(request) <= self.max_len

    def needs_plan(self) -> bool:
        """Whether the KV cache must be (re)allocated before the waiting rows can run: there is none, or no
        waiting row fits it (then the running rows have drained)."""
        return not self.slots or not any(self.fits(row.request) for row in self.waiting)

    def resize(self, slots: int, max_len: int, pool=None) -> None:
        self.slots, self.max_len, self.pool = [None] * slots, max_len, pool

    def admit(self, budget: int) -> list[tuple[int, Row]]:
        """The next prefill group, in free slots, as (slot, row): the longest waiting prompts that fit, of
        the oldest arrival block, within ``budget`` tokens (rows x longest prompt) and, paged, the free blocks
        (a row that needs more than are free waits, and the rows after it too: long rows are not starved)."""
        free = [s for s, row in enumerate(self.slots) if row is None]
        group = self._group(len(free), budget) if free else []
        for slot, row in zip(free, group):
            self.slots[slot], row.status = row, RUNNING
            self.waiting.remove(row)
            if self.pool:
                row.blocks = self.pool.take(tokens(row.request))
        return list(zip(free, group))

    def _group(self, free: int, budget: int) -> list[Row]:
        while True:
            ready = sorted((row for row in self.waiting if self.fits(row.request)),
                           key=lambda row: (row.block, -len(row.request.input_ids)))[:free]
            group, width, blocks = [], 0, len(self.pool.free) if self.pool else 0
            for row in ready:
                error = self.prepare(row)  # first: a vision row's length is exact only after it
                if error is not None:
                    self.waiting.remove(row)
                    self.fail(row, error)
                    continue
                if self.pool and (blocks := blocks - self.pool.need(tokens(row.request))) < 0:
                    return group  # the rest waits for running rows' blocks
                new_width = max(width, self.cost(row.request))
                if group and new_width * (len(group) + 1) > budget:
                    break
                group.append(row)
                width = new_width
            if group or not ready:
                return group

    def release(self, slot: int) -> Row:
        """The row in ``slot``, which has finished."""
        row, self.slots[slot] = self.slots[slot], None
        row.status = FINISHED
        if self.pool:
            self.pool.give(row.blocks)
        row.blocks = []
        return row

    def preempt(self) -> list[Row]:
        """The running rows, out of their slots, which are gone until the next :meth:`resize`."""
        running = [row for row in self.slots if row is not None]
        self.slots, self.pool = [], None
        for row in running:
            row.blocks = []
        return running

    def requeue(self, rows: list[Row]) -> None:
        """Preempted rows back in the window, first (block 0): they restart from their prompt."""
        for row in rows:
            row.block, row.status = 0, WAITING
            self.waiting.append(row)
            self.enqueue(row)

    def fail(self, row: Row, error: str) -> None:
        row.status = FINISHED
        self.ended.append((row.tag, Completion(None, 0, "error", error)))

    def take_ended(self) -> list[tuple[Any, Completion]]:
        ended, self.ended = self.ended, []
        return ended
