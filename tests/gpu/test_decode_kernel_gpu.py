"""The Triton decode attention against plain torch attention over the masked cache, for the shapes the
families have: GQA groups 1-8, head dims 64-256, sliding windows, sinks (gpt-oss), soft-capping, rows of
every length from one key to the cache's width, few slots (several key ranges merged) and many (one)."""

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def reference(q, k, v, pos, scale, window=None, sinks=None, softcap=None):
    slots, heads, _ = q.shape
    group = heads // k.shape[1]
    k, v = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
    scores = torch.einsum("shd,shnd->shn", q.float(), k) * scale
    if softcap:
        scores = (scores / softcap).tanh() * softcap
    cols = torch.arange(k.shape[2], device=q.device)[None, :]
    seen = cols <= pos[:, None]
    if window:
        seen &= cols > pos[:, None] - window
    scores = scores.masked_fill(~seen[:, None, :], float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.float()[None, :, None].expand(slots, heads, 1)], -1)
    probs = scores.softmax(-1)[..., :k.shape[2]]
    return torch.einsum("shn,shnd->shd", probs, v)


CASES = [  # slots, heads, kv_heads, head_dim, width, window, sinks, softcap
    (512, 28, 4, 128, 512, None, False, None),  # Qwen2-7B, many slots: one key range
    (8, 28, 4, 128, 512, None, False, None),  # few slots: ranges merged
    (64, 16, 8, 256, 1024, 64, False, None),  # Gemma 3: wide heads, a window
    (64, 64, 8, 64, 256, 16, True, None),  # gpt-oss: sinks and a window
    (32, 8, 8, 64, 128, None, False, 50.0),  # no GQA, soft-capping
    (16, 14, 2, 64, 2048, None, True, 30.0),  # group 7 (Qwen2-0.5B), long cache
    (24, 32, 32, 96, 256, None, False, None),  # head dim 96, not a power of two (Phi-3-mini)
    (24, 32, 8, 80, 256, 32, False, None),  # head dim 80
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matches_torch(case, dtype):
    from airflow_hfllm.engine.decode_kernel import decode_attention

    slots, heads, kv_heads, head_dim, width, window, sinks, softcap = case
    dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    q = torch.randn(slots, heads, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(slots, kv_heads, width, head_dim, device="cuda", dtype=dtype)
    v = torch.randn(slots, kv_heads, width, head_dim, device="cuda", dtype=dtype)
    pos = torch.randint(0, width, (slots,), device="cuda")
    pos[0], pos[-1] = 0, width - 1  # one key; the whole cache
    sink = torch.randn(heads, device="cuda", dtype=dtype) if sinks else None
    scale = head_dim ** -0.5
    got = decode_attention(q, k, v, pos, scale, window, sink, softcap).float()
    want = reference(q, k, v, pos, scale, window, sink, softcap)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got, want, atol=tol, rtol=tol), (got - want).abs().max().item()


def test_in_a_cuda_graph():
    """Captured once and replayed with new positions, as the fast engine's decode step is."""
    from airflow_hfllm.engine.decode_kernel import decode_attention

    torch.manual_seed(0)
    q = torch.randn(32, 8, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(32, 2, 256, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    pos = torch.zeros(32, dtype=torch.long, device="cuda")
    decode_attention(q, k, v, pos, 0.1)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, pos, 0.1)
    for step in (5, 100, 255):
        pos.fill_(step)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.allclose(out.float(), reference(q, k, v, pos, 0.1), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3], CASES[5]])
def test_an_fp8_cache_is_read_as_its_values(case):
    """kv_cache_dtype='fp8': the kernel reads e4m3 keys and values and converts them in registers; the
    result is attention over those values (checked under Triton's CPU interpreter with fp32 and fp16 queries
    before its first GPU run: 8e-7 / 7e-3)."""
    from airflow_hfllm.engine.decode_kernel import decode_attention

    slots, heads, kv_heads, head_dim, width, window, sinks, softcap = case
    torch.manual_seed(0)
    q = torch.randn(slots, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(slots, kv_heads, width, head_dim, device="cuda").to(torch.float8_e4m3fn) for _ in "kv")
    pos = torch.randint(0, width, (slots,), device="cuda")
    pos[0], pos[-1] = 0, width - 1
    sink = torch.randn(heads, device="cuda", dtype=torch.bfloat16) if sinks else None
    scale = head_dim ** -0.5
    got = decode_attention(q, k, v, pos, scale, window, sink, softcap).float()
    want = reference(q, k.to(torch.bfloat16), v.to(torch.bfloat16), pos, scale, window, sink, softcap)
    assert torch.allclose(got, want, atol=2e-2, rtol=2e-2), (got - want).abs().max().item()


def paged(cache, page: int = 64, seed: int = 1):
    """A [slots, kv_heads, width, head_dim] cache as shuffled blocks [blocks, kv_heads, page, head_dim] (block
    0 left as garbage, as the engine's) and the table [slots, width / page] that reads it back."""
    slots, heads, width, dim = cache.shape
    per_slot = width // page
    order = torch.randperm(slots * per_slot, generator=torch.Generator().manual_seed(seed)).to(cache.device) + 1
    blocks = torch.randn(slots * per_slot + 1, heads, page, dim, device=cache.device).to(cache.dtype)
    blocks[order] = cache.reshape(slots, heads, per_slot, page, dim).transpose(1, 2).reshape(-1, heads, page, dim)
    return blocks, order.reshape(slots, per_slot)


@pytest.mark.parametrize("case", [c for c in CASES if c[4] % 64 == 0])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_paged_cache_reads_the_keys_its_table_names(case, dtype):
    """paged=True: each slot's keys in blocks of 64 anywhere in the cache, found through its table (windows
    that start inside a block, sinks, soft-capping, few and many slots)."""
    from airflow_hfllm.engine.decode_kernel import decode_attention

    slots, heads, kv_heads, head_dim, width, window, sinks, softcap = case
    dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    q = torch.randn(slots, heads, head_dim, device="cuda", dtype=dtype)
    k, v = (torch.randn(slots, kv_heads, width, head_dim, device="cuda", dtype=dtype) for _ in "kv")
    pos = torch.randint(0, width, (slots,), device="cuda")
    pos[0], pos[-1] = 0, width - 1
    sink = torch.randn(heads, device="cuda", dtype=dtype) if sinks else None
    scale = head_dim ** -0.5
    (k_blocks, table), (v_blocks, _) = paged(k), paged(v)
    got = decode_attention(q, k_blocks, v_blocks, pos, scale, window, sink, softcap, table=table).float()
    want = reference(q, k, v, pos, scale, window, sink, softcap)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got, want, atol=tol, rtol=tol), (got - want).abs().max().item()
