"""Shared-prefix reuse: the keys and values of a prompt prefix that many rows share (a system prompt,
instructions, few-shot examples) are computed once per engine and copied into each row's slot; the row's
prefill computes only the tokens after it.

Prefixes are found automatically, without torch (like the scheduler): when a row about to be prefilled
starts with no cached prefix, it is compared with the rows in view (its group and the waiting window), and
the prefix length that saves the most prefill (length x rows that share it) becomes a cached prefix when it
is at least :data:`MIN_TOKENS` long and another row shares it. A few prefixes stay cached (:data:`SIZE`),
the oldest dropped first, so rows of several system prompts do not recompute theirs in turn. The KV cache
is not paged, so a prefix is copied into each slot rather than shared in place: what is saved is its
prefill, most of a long-prefix job's prompt work. Each row keeps at least one token of its own: the first
sample needs its logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

# below this a prefix's prefill costs about what a separate prefill call does: not worth a group of its own
MIN_TOKENS = 64
SIZE = 4  # prefixes cached
VIEW = 128  # waiting rows a new row is compared with


@dataclass(eq=False)
class Prefix:
    ids: list[int]
    kv: Any = field(repr=False)  # the engine's keys and values for it


def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share; 0 when fewer than :data:`MIN_TOKENS`."""
    n = min(len(a), len(b))
    if n < MIN_TOKENS or list(a[:MIN_TOKENS]) != list(b[:MIN_TOKENS]):  # most pairs: one short compare
        return 0
    if list(a[:n]) == list(b[:n]):
        return n
    lo, hi = MIN_TOKENS, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]: bisect in C-speed slice compares
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if list(a[lo:mid]) == list(b[lo:mid]) else (lo, mid)
    return lo


class PrefixCache:
    """The engine's cached prefixes. :param enabled: ``False`` prefills every row whole
    (``FastEngine(prefix_reuse=False)``)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.entries: list[Prefix] = []  # oldest first
        self.saved = 0  # prompt tokens whose prefill was skipped, net of the prefixes' own
        self.computed = 0

    def match(self, ids: Sequence[int]) -> Prefix | None:
        """The longest cached prefix that ``ids`` starts with (and goes on after)."""
        best = None
        for entry in self.entries:
            p = len(entry.ids)
            if len(ids) > p and (best is None or p > len(best.ids)) and ids[p - 1] == entry.ids[-1] \
                    and list(ids[:p]) == entry.ids:
                best = entry
        return best

    def cost(self, ids: Sequence[int]) -> int:
        """The tokens a row's prefill computes: the scheduler's group budget counts these."""
        entry = self.match(ids) if self.enabled else None
        return len(ids) - (len(entry.ids) if entry else 0)

    def candidate(self, ids: Sequence[int], others: Sequence[Sequence[int]]) -> int:
        """The prefix length of ``ids`` that saves the most prefill among ``others``, or 0."""
        shared = sorted((min(common_length(ids, o), len(o) - 1) for o in others if o is not ids), reverse=True)
        best, length = 0, 0
        for count, n in enumerate(shared, start=2):  # ids itself and the rows sharing at least n tokens
            n = min(n, len(ids) - 1)
            if n >= MIN_TOKENS and n * count > best:
                best, length = n * count, n
        return length

    def split(self, group: list[Sequence[int]], window: list[Sequence[int]],
              compute: Callable[[list[int]], Any]) -> list[tuple[Prefix | None, list[int]]]:
        """The group's row indices by the prefix their prefill reuses (``None``: the whole prompt), computing
        new prefixes' keys and values with ``compute(ids)``."""
        if not self.enabled:
            return [(None, list(range(len(group))))]
        found = [self.match(ids) for ids in group]
        # a row that shares nothing costs a comparison with every row in view: try the first two only
        for i in [i for i, f in enumerate(found) if f is None][:2]:
            ids = group[i]
            if found[i] is None and (n := self.candidate(ids, group + window[:VIEW])):
                entry = Prefix(list(ids[:n]), compute(list(ids[:n])))
                self.entries = self.entries[-(SIZE - 1):] + [entry]
                self.computed += 1
                self.saved -= n
                found = [f if f is not None else self.match(other) for f, other in zip(found, group)]
        parts: dict[int, tuple[Prefix | None, list[int]]] = {}
        for i, entry in enumerate(found):
            parts.setdefault(id(entry), (entry, []))[1].append(i)
            self.saved += len(entry.ids) if entry else 0
        return list(parts.values())

    def stats(self) -> dict:
        return {"prefix_tokens_saved": self.saved, "prefixes_computed": self.computed}
