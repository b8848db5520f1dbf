"""DeBERTa's relative-position bias (c2p + p2c, padded keys masked) as one Triton kernel, for
:mod:`~airflow_hfllm.safety.deberta` on a GPU.

The bias of a query i and key j is ``c2p[i, r] + p2c[j, r]`` with r the bucket of the distance i - j, where
``c2p = q . pos_key`` and ``p2c = k . pos_query`` over the relative-position embeddings. Gathering both by an
index tensor [rows, heads, L, L] (transformers' way, and inductor's fused gather) was the classifier's largest
kernel on an H200: 36% of its GPU time (docs/benchmarks.md). Here:

- the products cover only the buckets that distances of a pass of width L can reach (up to 2L - 1 of the 512
  embeddings, rounded up to 8 for cuBLAS), as one batched GEMM per term over all rows of a head;
- the kernel (:func:`bias`) reads r from a table over i - j (2L - 1 entries), c2p along its rows
  (consecutive keys j read consecutive buckets), and p2c as the transposed tile (consecutive queries i read
  consecutive buckets of key j's row), so both reads are coalesced; the sum is written once, masked, in rows
  padded to 8 elements for SDPA's memory-efficient kernel.

:func:`attention_op` (the bias, then SDPA's memory-efficient kernel over it) is a custom op
(``airflow_hfllm::deberta_attention``): a compiled forward calls it as one opaque step. On an H200 the bias
kernel took 8.7 ms of GPU time where inductor's gathers took 20.4 (the small profile), and the standard
batch's checks 0.212 s against 0.257. Imported only where Triton and CUDA are; Triton's kernels are
module-level functions, so it is imported at the top here (torch, as everywhere, in the calls: the op is
registered on first use, :func:`attention_op`).
"""

from __future__ import annotations

import functools
import math

import triton
import triton.language as tl

# Triton compiles a kernel per pattern of its integer arguments (divisible by 16 or not, equal to 1); a
# check's passes have widths of every kind, so the sizes are plain arguments and one compile serves all.
# Tiles: timed once per process on the first pass (a 64 x 64 tile of gathers at 4 warps spills registers).
@triton.autotune(configs=[triton.Config({"BLOCK_I": bi, "BLOCK_J": bj}, num_warps=w)
                          for bi, bj, w in ((32, 64, 4), (16, 64, 4), (64, 64, 8), (32, 128, 8), (32, 32, 4))],
                 key=[])
@triton.jit(do_not_specialize=["heads", "rows", "width", "size", "low", "padded"])
def _bias(C2P, P2C, Table, Keep, Out, masked, heads, rows, width, size, low, padded,
          HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    bh = tl.program_id(0)
    b, h = bh // heads, bh % heads
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    j = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)
    inside = (i[:, None] < width) & (j[None, :] < width)
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    # the products are [heads, rows * width, size]: a head's rows one after another
    base = h.to(tl.int64) * rows * width * size + b.to(tl.int64) * width * size
    if HAS_C2P:  # c2p[i, r(i - j)]: along query i's row
        r = tl.load(Table + i[:, None] - j[None, :] + width - 1, mask=inside, other=0) - low
        acc += tl.load(C2P + base + i[:, None] * size + r, mask=inside, other=0.0).to(tl.float32)
    if HAS_P2C:  # p2c[j, r(i - j)], read as the [j, i] tile: along key j's row
        inside_t = (j[:, None] < width) & (i[None, :] < width)
        r_t = tl.load(Table + i[None, :] - j[:, None] + width - 1, mask=inside_t, other=0) - low
        acc += tl.trans(tl.load(P2C + base + j[:, None] * size + r_t, mask=inside_t, other=0.0).to(tl.float32))
    keep = tl.load(Keep + b * width + j, mask=j < width, other=0)
    acc = tl.where(keep[None, :] != 0, acc, masked)
    out = Out + bh.to(tl.int64) * width * padded + i[:, None] * padded + j[None, :]  # [rows, heads, L, padded]
    tl.store(out, acc.to(Out.dtype.element_ty), mask=inside)


def bucket(distance: int, buckets: int, longest: int) -> int:
    """transformers' ``make_log_bucket_position`` of one distance >= 0, in Python floats."""
    mid = buckets // 2
    if buckets <= 0 or longest <= 0 or distance <= mid:
        return distance
    return int(math.ceil(math.log(distance / mid) / math.log((longest - 1) / mid) * (mid - 1)) + mid)


def window(width: int, span: int, buckets: int, longest: int) -> tuple[int, int]:
    """(first embedding, count) of the relative-position embeddings that distances of a pass of ``width``
    can reach: one bucket of margin each side (a float rounding apart from the device's buckets), rounded
    up to 8."""
    far = bucket(width - 1, buckets, longest)
    low, high = max(0, span - far - 1), min(2 * span - 1, span + far + 1)
    size = min(2 * span, -(-(high - low + 1) // 8) * 8)
    return min(low, 2 * span - size), size


@functools.cache
def attention_op():
    """The custom op ``airflow_hfllm::deberta_attention(q, k, v, pos_key, pos_query, table, keep, scale, buckets,
    longest)``: DeBERTa's attention output [rows, L, heads, hd] of q, k, v [rows, heads, L, hd], SDPA's
    memory-efficient kernel with the bias of :func:`bias` (scale: the scores'). One op, so that a compiled
    forward hands SDPA the bias as the kernel wrote it (inductor copied a bias it could not prove aligned:
    9% of the GPU time)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from airflow_hfllm.safety.deberta import SDPA_BACKENDS

    schema = ("(Tensor q, Tensor k, Tensor v, Tensor? pos_key, Tensor? pos_query, Tensor table, Tensor keep, "
              "float scale, int buckets, int longest) -> Tensor")

    @torch.library.custom_op("airflow_hfllm::deberta_attention", mutates_args=(), schema=schema)
    def attention(q, k, v, pos_key, pos_query, table, keep, scale, buckets, longest):
        width = q.shape[2]
        mask = bias(q * scale, k * scale, pos_key, pos_query, table, keep, buckets, longest)[..., :width]
        with sdpa_kernel([getattr(SDPBackend, name) for name in SDPA_BACKENDS]):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return out.transpose(1, 2).contiguous()

    @attention.register_fake
    def _(q, k, v, pos_key, pos_query, table, keep, scale, buckets, longest):
        rows, heads, width, hd = q.shape
        return q.new_empty(rows, width, heads, hd)

    return attention


def bias(q, k, pos_key, pos_query, table, keep, buckets: int, longest: int):
    """The scaled c2p + p2c bias [rows, heads, L, L8] (L8: L rounded up to 8; take ``[..., :L]``), padded keys
    at the dtype's lowest value. q, k [rows, heads, L, hd] already scaled; pos_key / pos_query [2 * span, heads,
    hd] (None: the term is off); table [2L - 1] int32: the embedding index (bucket + span, clamped) of the
    distance d - (L - 1); keep [rows, L] bool: the real keys."""
    import torch

    rows, heads, width, hd = q.shape
    span = (pos_key if pos_key is not None else pos_query).shape[0] // 2
    low, size = window(width, span, buckets, longest)

    def product(x, pos):  # [heads, rows * L, size]: one GEMM per head over all rows
        if pos is None:
            return None
        xh = x.transpose(0, 1).reshape(heads, rows * width, hd)
        return torch.bmm(xh, pos[low:low + size].permute(1, 2, 0))

    c2p, p2c = product(q, pos_key), product(k, pos_query)
    padded = -(-width // 8) * 8
    out = q.new_empty(rows, heads, width, padded)

    def grid(meta):
        return rows * heads, triton.cdiv(width, meta["BLOCK_I"]), triton.cdiv(width, meta["BLOCK_J"])

    _bias[grid](c2p if c2p is not None else p2c, p2c if p2c is not None else c2p, table,
                keep.to(torch.int8).contiguous(), out, torch.finfo(q.dtype).min, heads, rows, width, size, low, padded,
                HAS_C2P=c2p is not None, HAS_P2C=p2c is not None)
    return out
