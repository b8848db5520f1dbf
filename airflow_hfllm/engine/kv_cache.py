"""The fast engine's KV cache: its size, and where a row's keys and values go in it.

Two layouts, per layer. *Static*: [slots, kv_heads, width, head_dim], every slot as wide as the longest row
(a slot is a row's place in the cache). *Paged* (where memory limits the slots, :func:`plan`, or
``FastEngine(paged=True)``): [blocks, kv_heads, :data:`BLOCK`, head_dim] with a table [slots, width / BLOCK]
of each slot's blocks. A row takes the blocks its prompt and ``max_new_tokens`` need when it is admitted and
gives them back when it leaves, so a mixed batch (16-512 new tokens a row) reserves each row's own length,
not the longest row's for every slot, and more rows decode together in the same memory. Block 0 is never
given out: a slot without a row points there (as do a padded prefill's positions past a row's blocks), so
their writes land where nothing is read.
:class:`BlockPool` is torch-free, as the scheduler that uses it.
"""

from __future__ import annotations

import math

BLOCK = 64  # tokens per block: a multiple of the decode kernel's key tiles (engine/decode_kernel.py)
MAX_SLOTS = 512  # the 7B standard batch 10% faster than 256 on an H200 (docs/benchmarks.md); more is unmeasured


class BlockPool:
    """The paged cache's free blocks (1 .. blocks - 1)."""

    def __init__(self, blocks: int):
        self.free = list(range(blocks - 1, 0, -1))  # taken from the end: low ids first

    @staticmethod
    def need(tokens: int) -> int:
        return -(-tokens // BLOCK)

    def take(self, tokens: int) -> list[int]:
        n = self.need(tokens)
        if n > len(self.free):
            raise RuntimeError(f"{n} KV blocks wanted, {len(self.free)} free")  # the scheduler checks first
        taken, self.free = self.free[len(self.free) - n:][::-1], self.free[:len(self.free) - n]
        return taken

    def give(self, blocks: list[int]) -> None:
        self.free.extend(reversed(blocks))


def width(need: int, paged: bool) -> int:
    """Tokens per slot for rows of up to ``need`` tokens: one of 8 widths per power of two (at least 64), so
    later chunks mostly reuse the graph and a static cache spares under 1/8 of the next power of two (a power
    of two spared up to half: Gemma 3 12B's standard batch then fit 480 of its 512 rows); whole blocks when
    paged."""
    step = (1 << max(6, math.ceil(math.log2(need)))) // 8
    size = max(64, math.ceil(need / step) * step)
    return math.ceil(size / BLOCK) * BLOCK if paged else size


def plan(engine, requests) -> tuple[int, int, int | None]:
    """(slots, width, blocks) of a cache for ``requests`` on ``engine``: the allocated one while it fits
    them; slots from free GPU memory (at most :data:`MAX_SLOTS`; 16 on the CPU); ``blocks`` for a paged
    cache, else ``None``. ``engine.paging`` ``None`` (auto) pages on a GPU with the decode kernel where
    memory holds fewer static slots than :data:`MAX_SLOTS`: on an H200 that ran Gemma 3 12B's mixed batch
    in 512 paged slots 11% faster than in 272 static ones (5% compiled), where a 7B's 512 static slots ran
    2% faster than paged (docs/benchmarks.md). Paged blocks fill what the slots' other state leaves, up to
    every slot's widest row: more would never be taken."""
    import torch

    from airflow_hfllm.engine.generate import kv_bytes_per_token
    from airflow_hfllm.engine.logprobs import SlotLogprobs
    from airflow_hfllm.engine.scheduler import tokens

    need = max(map(tokens, requests))
    if engine._shape and engine._shape[1] >= need:
        return engine._shape
    per_token = kv_bytes_per_token(engine.model, engine.kv_dtype)

    def state(size: int) -> int:  # the rest of a slot's state: its output ids, log-probabilities, penalty counts
        return size * (8 + SlotLogprobs.bytes_per_token(engine.params.logprobs)) + engine.vocab * (
            12 if engine._counted else 8)

    room = None  # blocks that free GPU memory holds besides the slots' other state
    if engine.max_slots or engine.device.type != "cuda":
        paged, slots = bool(engine.paging), engine.max_slots or 16
        size = width(need, paged)
    else:
        engine._release()
        free, _ = torch.cuda.mem_get_info(engine.device)
        budget = max(0, free - 6 * 2**30) * 0.85  # room for prefill activations and the allocator

        def fit(per_slot: float) -> int:
            return int(max(8, min(MAX_SLOTS, budget // per_slot // 8 * 8)))

        size = width(need, False)
        slots = fit(size * per_token + state(size))
        paged = engine.paging if engine.paging is not None else (
            engine.decoder.kernel is not None and slots < MAX_SLOTS)
        if paged:
            size = width(need, True)
            slots = fit(state(size) + BLOCK * per_token)
            room = (budget - slots * state(size)) // (BLOCK * per_token)
    if not paged:
        return slots, size, None
    full = slots * BlockPool.need(size) + 1  # every slot's widest row (a static cache's memory)
    blocks = engine.kv_blocks or int(full if room is None else min(room, full))
    return slots, size, max(blocks, BlockPool.need(size) + 1)  # the widest row fits once the others drained


def prompt_write(cache, values, rows, start: int, table=None) -> None:
    """``values`` [n, kv_heads, t, head_dim] as the keys (or values) of slots ``rows`` [n] at positions
    ``start .. start + t``."""
    from airflow_hfllm.engine.decoder import stored

    n, _, t, _ = values.shape
    if table is None:
        cache[rows, :, start:start + t] = stored(values, cache)
        return
    import torch

    cols = torch.arange(start, start + t, device=values.device)
    cache[table[rows][:, cols // BLOCK], :, (cols % BLOCK).expand(n, t)] = stored(values.transpose(1, 2), cache)


def step_write(cache, values, rows, pos, table=None) -> None:
    """``values`` [slots, kv_heads, head_dim] as the keys (or values) of slots ``rows`` at positions ``pos``."""
    from airflow_hfllm.engine.decoder import stored

    if table is None:
        cache[rows, :, pos] = stored(values, cache)
    else:
        cache[table[rows, pos // BLOCK], :, pos % BLOCK] = stored(values, cache)


def dense(cache, table=None):
    """A layer's keys (or values) as [slots, kv_heads, width, head_dim]: a paged cache gathered by its
    table (the CPU's decode path, which attends over the whole width)."""
    if table is None:
        return cache
    slots, per_slot = table.shape
    _, heads, block, dim = cache.shape
    return cache[table].transpose(1, 2).reshape(slots, heads, per_slot * block, dim)
