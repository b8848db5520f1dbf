"""The KV cache's widths, its block pool, and the paged layout's writes read back as the static layout's."""

import math

import pytest

from airflow_hfllm.engine.kv_cache import BLOCK, BlockPool, dense, prompt_write, step_write, width


def test_widths_spare_under_an_eighth_of_the_next_power_of_two_and_pages_are_whole_blocks():
    assert [width(n, paged=False) for n in (1, 64, 65, 100, 428, 812, 1500)] == [64, 64, 80, 112, 448, 896, 1536]
    assert [width(n, paged=True) for n in (65, 100, 428)] == [128, 128, 448]
    assert all(n <= width(n, False) < max(65, n + 2 ** math.ceil(math.log2(n)) / 8) for n in range(1, 5000, 7))


def test_pool_gives_each_block_once_and_never_block_0():
    pool = BlockPool(6)
    a, b = pool.take(BLOCK + 1), pool.take(3 * BLOCK)
    assert a == [1, 2] and b == [3, 4, 5] and pool.free == []
    with pytest.raises(RuntimeError, match="1 KV blocks wanted, 0 free"):
        pool.take(1)
    pool.give(a)
    assert sorted(pool.take(2 * BLOCK)) == [1, 2]


def test_paged_writes_read_back_as_the_static_cache():
    import torch

    slots, heads, size, dim = 3, 2, 2 * BLOCK, 4
    static = torch.zeros(slots, heads, size, dim)
    blocks = torch.randn(8, heads, BLOCK, dim)  # block 0 and unused blocks hold garbage
    table = torch.tensor([[5, 2], [7, 0], [1, 3]])  # slot 1 holds one block: its other positions go to block 0
    rows = torch.tensor([0, 2])
    prompt = torch.randn(2, heads, 90, dim)  # a prefill of 90 positions from 10 on, across the block boundary
    prompt_write(static, prompt, rows, 10)
    prompt_write(blocks, prompt, rows, 10, table)
    step = torch.randn(slots, heads, dim)
    pos = torch.tensor([127, 20, 100])
    step_write(static, step, torch.arange(slots), pos)
    step_write(blocks, step, torch.arange(slots), pos, table)
    got = dense(blocks, table)
    assert got.shape == static.shape
    for slot, seen in ((0, 128), (2, 128), (1, 64)):
        written = static[slot, :, :seen] != 0
        assert torch.equal(got[slot, :, :seen][written], static[slot, :, :seen][written])
    assert torch.equal(got[0, :, 10:100], prompt[0]) and torch.equal(got[2, :, 100], step[2])
    assert torch.equal(got[1, :, 20], step[1])
