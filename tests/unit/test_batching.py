"""Batching must not change results: batched greedy output == one prompt at a time."""

from airflow_hfllm.engine.generate import BatchedGenerator, Request
from airflow_hfllm.engine.loading import get_model
from airflow_hfllm.config import GenerationParams, ModelSpec
from tests.conftest import chat_requests


def test_batched_greedy_equals_one_at_a_time(tiny_lm):
    loaded = get_model(ModelSpec(tiny_lm))
    params = GenerationParams(max_new_tokens=24, do_sample=False)
    requests = chat_requests(loaded.tokenizer, 200, 24)
    lengths = sorted(len(r.input_ids) for r in requests)
    assert lengths[0] < 40 and lengths[-1] > 150, "prompts must be of mixed lengths"

    batched_gen = BatchedGenerator(loaded, params, max_batch_size=32, token_budget=4096)
    batches = batched_gen.batches(requests)
    assert len(batches) > 6 and max(len(b) for b in batches) > 8, "the test must really batch"
    batched = batched_gen.generate(requests)
    single = BatchedGenerator(loaded, params, max_batch_size=1).generate(requests)

    # Not vacuous: the outputs are long and varied.
    texts = [c.text for c in single]
    assert sum(c.output_tokens >= 8 for c in single) >= 180
    assert len(set(texts)) >= 150
    assert sum(c.finish_reason == "length" for c in single) >= 100

    assert [c.text for c in batched] == texts
    assert [c.output_tokens for c in batched] == [c.output_tokens for c in single]
    assert [c.finish_reason for c in batched] == [c.finish_reason for c in single]


def test_batches_respect_budget_and_cap(tiny_lm):
    loaded = get_model(ModelSpec(tiny_lm))
    gen = BatchedGenerator(loaded, GenerationParams(max_new_tokens=10, do_sample=False),
                           max_batch_size=5, token_budget=200)
    requests = [Request([1] * n, 10) for n in (5, 50, 8, 30, 12, 3, 3, 3, 3, 3, 3, 3, 90)]
    batches = gen.batches(requests)
    assert sorted(i for b in batches for i in b) == list(range(len(requests)))
    for batch in batches:
        assert len(batch) <= 5
        width = max(len(requests[i].input_ids) for i in batch) + 10
        assert len(batch) == 1 or len(batch) * width <= 200
    # longest first: the first batch holds the 90-token prompt
    assert 12 in batches[0]


def test_per_row_max_new_tokens_and_stop_strings(tiny_lm):
    loaded = get_model(ModelSpec(tiny_lm))
    tok = loaded.tokenizer
    requests = chat_requests(tok, 10, lambda i: 4 if i % 2 else 20)
    out = BatchedGenerator(loaded, GenerationParams(max_new_tokens=20, do_sample=False)).generate(requests)
    for i, c in enumerate(out):
        assert c.output_tokens <= (4 if i % 2 else 20)
    long_row = next(c for i, c in enumerate(out) if i % 2 == 0 and c.output_tokens == 20)
    # A stop string taken from a real output cuts the text just before it.
    words = long_row.text.split()
    assert len(words) >= 3
    stop = words[2]
    cut = BatchedGenerator(loaded, GenerationParams(max_new_tokens=20, do_sample=False, stop=(stop,))).generate(
        [requests[out.index(long_row)]])[0]
    assert stop not in cut.text
    assert long_row.text.startswith(cut.text)
    assert cut.finish_reason == "stop"


def test_scheduler_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, airflow_hfllm.engine.scheduler; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0


def test_scheduler_admits_block_by_block_and_requeues_first():
    from airflow_hfllm.engine.scheduler import FINISHED, RUNNING, WAITING, Scheduler

    lengths = [3, 9, 5, 40, 7, 8, 2]  # the 40-token prompt never fits the 30-token slots
    entered = []
    sched = Scheduler(((i, Request([0] * n, 2), f"k{i}") for i, n in enumerate(lengths)), lookahead=3,
                      enqueue=entered.append, prepare=lambda row: "bad image" if row.tag == 4 else None)
    sched.refill()
    assert [r.tag for r in sched.waiting] == [0, 1, 2] and [r.block for r in sched.waiting] == [0, 0, 0]
    sched.resize(2, 30)
    sched.refill()  # 2 slots: still up to max(lookahead, 2 x slots) waiting
    assert len(sched.waiting) == 4 and not sched.needs_plan()
    # longest first within the first block of arrivals; budget 20 tokens = 2 rows of 10
    group = sched.admit(20)
    assert [(s, r.tag) for s, r in group] == [(0, 1), (1, 2)] and all(r.status == RUNNING for _, r in group)
    assert sched.admit(20) == []  # no free slot
    done = sched.release(0)
    assert done.tag == 1 and done.status == FINISHED
    sched.refill()
    assert [r.tag for _, r in sched.admit(20)] == [0]  # block 0 before the longer rows of block 1
    running = sched.preempt()
    assert [r.tag for r in running] == [0, 2] and sched.slots == [] and sched.needs_plan()
    sched.requeue(running)
    sched.resize(3, 30)
    sched.refill()
    assert [r.tag for _, r in sched.admit(1000)] == [2, 0, 5]  # requeued rows go first (block 0)
    sched.release(1)
    # row 4's images fail: it ends without a slot, and the next row takes the slot
    assert [(s, r.tag) for s, r in sched.admit(1000)] == [(1, 6)]
    assert sched.take_ended()[0][1].error == "bad image" and sched.take_ended() == []
    assert [(r.tag, r.status) for r in sched.waiting] == [(3, WAITING)] and sched.needs_plan()  # 40 tokens
    assert [r.tag for r in entered] == [0, 1, 2, 3, 4, 5, 0, 2, 6]


def test_paged_scheduler_admits_by_free_blocks_and_returns_them():
    from airflow_hfllm.engine.kv_cache import BLOCK, BlockPool
    from airflow_hfllm.engine.scheduler import Scheduler

    # rows of 1, 3, 1 and 2 blocks (prompt + max_new_tokens); 8 slots but 4 blocks to give (block 0 is kept)
    tokens = [BLOCK, 3 * BLOCK, BLOCK - 1, BLOCK + 1]
    sched = Scheduler(((i, Request([0] * (n - 1), 1), i) for i, n in enumerate(tokens)), lookahead=8)
    sched.refill()
    pool = BlockPool(5)
    sched.resize(8, 4 * BLOCK, pool)
    group = sched.admit(10**6)  # longest prompt first: 3 blocks; the next row needs 2 of the 1 left
    assert [(s, r.tag, r.blocks) for s, r in group] == [(0, 1, [1, 2, 3])] and pool.free == [4]
    assert sched.admit(10**6) == []  # row 0 would fit in 1 block, but waits behind row 3: no starving
    sched.release(0)
    assert sorted(pool.free) == [1, 2, 3, 4]
    group = sched.admit(10**6)
    assert [r.tag for _, r in group] == [3, 0, 2] and [len(r.blocks) for _, r in group] == [2, 1, 1]
    assert sorted(b for _, r in group for b in r.blocks) == [1, 2, 3, 4] and pool.free == []
    assert len(sched.preempt()) == 3 and sched.pool is None
