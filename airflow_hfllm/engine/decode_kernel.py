"""Decode attention as a Triton kernel: one new query per slot against that slot's keys in the static KV
cache, reading only the keys the row has (``pos + 1``, or the last ``window`` of them), not the cache's
whole width.

SDPA over the static cache (the CPU path, :meth:`airflow_hfllm.engine.decoder.Decoder.decode`) reads every
slot's full ``max_len`` and masks what is not there: on a 512-slot batch whose rows average half the width,
half of the KV bytes read per step are wasted, and a model with wide KV heads (Gemma 3 12B: 8 heads of 256
per layer, 7x Qwen2-7B's bytes per token) spends most of its step there. Split-K ("flash-decoding"): the
keys of a slot are cut into ``splits`` ranges, each program of the first kernel takes one (slot, KV head,
range) with the query heads of its GQA group as the rows of one ``tl.dot``, and the second kernel merges
the ranges by their log-sum-exp; an attention sink (gpt-oss) joins the softmax there as one more logit.
Soft-capping (Gemma 2 style) caps the scaled scores before the softmax, as the model does. An FP8 cache
(``kv_cache_dtype="fp8"``) is read as FP8 (half the bytes) and converted to the query's dtype in registers.

Imported only where Triton and CUDA are (:func:`airflow_hfllm.engine.decoder.decode_kernel`); Triton's
kernels are module-level functions, so it is imported at the top here (torch, as everywhere, in the call).
"""

from __future__ import annotations

import math

import triton
import triton.language as tl


@triton.jit
def _partial(Q, K, V, Pos, Table, O, Lse, scale, softcap,
             q_slot, q_head, k_slot, k_head, k_row, t_slot, o_slot, o_head, o_split, l_slot, l_head,
             GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
             IEEE: tl.constexpr, PAGE: tl.constexpr):
    slot, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    length = tl.load(Pos + slot) + 1  # keys 0..pos, the new one included
    start = split * SPLIT
    end = tl.minimum(start + SPLIT, length)
    if WINDOW > 0:
        start = tl.maximum(start, length - WINDOW)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    qmask = (g < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
    q = tl.load(Q + slot * q_slot + heads[:, None] * q_head + d[None, :], mask=qmask, other=0.0)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    # tiles start on a multiple of BLOCK_N (a window's first key need not), so a tile lies in one page; a
    # range with no keys runs no tile (one of masked keys only would give NaN)
    for n0 in range(tl.where(start < end, start // BLOCK_N * BLOCK_N, end), end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        if PAGE > 0:  # paged: the slot's table names the block of keys n0 .. n0 + BLOCK_N (int64 ids)
            base = tl.load(Table + slot * t_slot + n0 // PAGE) * k_slot + kv_head * k_head
            rows = n - n0 // PAGE * PAGE
        else:
            base = slot * k_slot + kv_head * k_head
            rows = n
        keep = (n >= start) & (n < end)
        kmask = keep[:, None] & (d < HEAD_DIM)[None, :]
        k = tl.load(K + base + rows[:, None] * k_row + d[None, :], mask=kmask, other=0.0).to(q.dtype)  # FP8
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        if SOFTCAP:
            s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)  # softcap * tanh(s / softcap)
        s = tl.where(keep[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        total = total * alpha + tl.sum(p, 1)
        v = tl.load(V + base + rows[:, None] * k_row + d[None, :], mask=kmask, other=0.0).to(q.dtype)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    # a range with no keys (past the row's end, or before its window) weighs nothing in the merge
    empty = total == 0.0
    out = acc / tl.where(empty, 1.0, total)[:, None]
    lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, total)))
    tl.store(O + slot * o_slot + heads[:, None] * o_head + split * o_split + d[None, :], out, mask=qmask)
    tl.store(Lse + slot * l_slot + heads * l_head + split, lse, mask=g < GROUP)


@triton.jit
def _merge(O, Lse, Sinks, Out, o_slot, o_head, o_split, l_slot, l_head, out_slot, out_head,
           SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
           SINKS: tl.constexpr):
    slot, head = tl.program_id(0), tl.program_id(1)
    r = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    lse = tl.load(Lse + slot * l_slot + head * l_head + r, mask=r < SPLITS, other=float("-inf"))
    m = tl.max(lse, 0)
    if SINKS:
        sink = tl.load(Sinks + head).to(tl.float32)
        m = tl.maximum(m, sink)
    w = tl.exp(lse - m)
    total = tl.sum(w, 0)
    if SINKS:
        total += tl.exp(sink - m)
    mask = (r < SPLITS)[:, None] & (d < HEAD_DIM)[None, :]
    o = tl.load(O + slot * o_slot + head * o_head + r[:, None] * o_split + d[None, :], mask=mask, other=0.0)
    out = tl.sum(o * w[:, None], 0) / total
    tl.store(Out + slot * out_slot + head * out_head + d, out.to(Out.dtype.element_ty), mask=d < HEAD_DIM)


def splits_for(slots: int, kv_heads: int, width: int, block: int) -> int:
    """Key ranges per slot: enough programs to fill the GPU (~4 per SM of 132) when slots are few, one
    range when they are many (the merge is then a copy)."""
    want = math.ceil(528 / max(1, slots * kv_heads))
    return max(1, min(want, math.ceil(width / block)))


def tiles_for(head_dim: int) -> tuple[int, int, int]:
    """(keys per tile, warps, pipeline stages) of :func:`_partial`, the fastest of
    ``benchmarks/decode_attention.py``'s sweep on an H200 (docs/benchmarks.md, 2026-12-03): 7B's bf16 layer
    116 -> 85 us, Gemma 3 12B's 278 -> 255 us (3.9 TB/s of its keys and values)."""
    return (32, 4, 3) if head_dim > 128 else (64, 4, 4)


def decode_attention(q, k_cache, v_cache, pos, scale: float, window: int | None = None, sinks=None,
                     softcap: float | None = None, tiles: tuple[int, int, int] | None = None, table=None):
    """Attention output [slots, heads, head_dim] of queries ``q`` [slots, heads, head_dim] against the keys
    and values [slots, kv_heads, width, head_dim] at indices ``max(0, pos - window + 1) .. pos``; paged
    (``table`` [slots, width / page] of int64 block ids): [blocks, kv_heads, page, head_dim]."""
    import torch

    slots, heads, head_dim = q.shape
    kv_heads, page = k_cache.shape[1], k_cache.shape[2]
    width = page * table.shape[1] if table is not None else page
    group = heads // kv_heads
    block_n, warps, stages = tiles or tiles_for(head_dim)
    splits = splits_for(slots, kv_heads, width, block_n)
    split = math.ceil(math.ceil(width / splits) / block_n) * block_n
    partial = torch.empty((slots, heads, splits, head_dim), device=q.device, dtype=torch.float32)
    lse = torch.empty((slots, heads, splits), device=q.device, dtype=torch.float32)
    out = torch.empty((slots, heads, head_dim), device=q.device, dtype=q.dtype)
    if q.stride(-1) != 1:
        q = q.contiguous()
    block_d = triton.next_power_of_2(head_dim)
    if table is not None and page % block_n:
        raise ValueError(f"a page of {page} keys is not a whole number of {block_n}-key tiles")
    _partial[(slots, kv_heads, splits)](
        q, k_cache, v_cache, pos, table if table is not None else pos, partial, lse, scale, softcap or 0.0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        table.stride(0) if table is not None else 0,
        partial.stride(0), partial.stride(1), partial.stride(2), lse.stride(0), lse.stride(1),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_N=block_n, SPLIT=split, WINDOW=window or 0, SOFTCAP=bool(softcap),
        IEEE=q.dtype == torch.float32, PAGE=page if table is not None else 0, num_warps=warps,
        num_stages=stages)
    _merge[(slots, heads)](
        partial, lse, sinks if sinks is not None else lse, out,
        partial.stride(0), partial.stride(1), partial.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        SPLITS=splits, BLOCK_S=max(2, triton.next_power_of_2(splits)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        SINKS=sinks is not None, num_warps=1 if head_dim <= 128 else 2)
    return out
