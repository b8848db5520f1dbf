"""CUDA out of memory, injected on the CPU (``torch.OutOfMemoryError`` raised where a GPU would raise it):
the batched generator splits the batch, the fast engine halves its slots and requeues the running rows;
no row is lost or changed, the splits reach ``stats()`` and the manifest's ``engine_stats``, and a row
that cannot run alone ends in ``error``. The same on a real GPU: ``tests/gpu/test_faults_gpu.py``."""

import gc
import weakref

import pandas as pd
import pytest
import torch

from airflow_hfllm.engine.fast import FastEngine
from airflow_hfllm.engine.generate import BatchedGenerator
from airflow_hfllm.config import GenerationParams, ModelSpec
from airflow_hfllm.run.job import TextJob
from tests.conftest import chat_requests, write_prompts

GREEDY = GenerationParams(max_new_tokens=12, do_sample=False)
SAMPLED = GenerationParams(max_new_tokens=12, do_sample=True, temperature=1.0, top_p=0.9)


@pytest.fixture(scope="module")
def reqs(loaded):
    return chat_requests(loaded.tokenizer, 24, 12)


@pytest.fixture(scope="module")
def single(loaded, reqs):
    return BatchedGenerator(loaded, GREEDY, max_batch_size=1).generate(reqs)


def same(a, b):
    return [(c.text, c.output_tokens, c.finish_reason) for c in a] == [(c.text, c.output_tokens, c.finish_reason)
                                                                       for c in b]


class Held:
    """Stands for the tensors a failed generate() call had built."""


def test_batched_splits_and_frees_the_failed_batch_before_the_halves(loaded, reqs, single):
    gen = BatchedGenerator(loaded, GREEDY, max_batch_size=32)
    assert [len(b) for b in gen.batches(reqs)] == [24]  # one batch
    run, failed, alive_at_retry = gen._generate, [], []

    def generate(batch, requests):
        alive_at_retry.append(sum(ref() is not None for ref in failed))
        if len(batch) > 4:
            held = Held()  # a local of the failing frame, as generate()'s KV cache is
            failed.append(weakref.ref(held))
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return run(batch, requests)

    gen._generate = generate
    out = gen.generate(reqs)
    assert same(out, single)
    # 24 -> 2 x 12 -> 4 x 6 -> 8 x 3: seven splits, no row alone out of memory
    assert gen.stats() == {"oom_splits": 7, "oom_errors": 0, "token_budget": gen.token_budget}
    assert gen.token_budget < 16_384
    # The halves ran after the failed call's frame was gone: its memory is free for them.
    assert alive_at_retry and set(alive_at_retry) == {0}


def test_batched_row_that_does_not_fit_alone_ends_in_error(loaded, reqs, single):
    gen = BatchedGenerator(loaded, GREEDY, max_batch_size=32)
    run, poison = gen._generate, reqs[5]

    def generate(batch, requests):
        if any(requests[i] is poison for i in batch):
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return run(batch, requests)

    gen._generate = generate
    out = gen.generate(reqs)
    assert out[5].finish_reason == "error" and out[5].text is None and "out of GPU memory" in out[5].error
    assert same(out[:5] + out[6:], single[:5] + single[6:])
    assert gen.stats()["oom_errors"] == 1 and gen.stats()["oom_splits"] >= 1


@pytest.mark.parametrize("where", ["kv_cache", "prefill", "decode"])
def test_fast_engine_halves_its_slots_and_requeues_the_running_rows(loaded, reqs, where):
    keys = [f"row-{i}" for i in range(len(reqs))]
    reference = FastEngine(loaded, SAMPLED, slots=8, steps_per_sync=3).generate(reqs, seed=5, keys=keys)
    engine = FastEngine(loaded, SAMPLED, slots=8, steps_per_sync=3)
    calls = {"n": 0}
    if where == "kv_cache":
        allocate = engine._allocate

        def fail(slots, max_len, blocks):
            if slots > 2:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            allocate(slots, max_len, blocks)

        engine._allocate, splits, slots = fail, 2, 2
    elif where == "prefill":
        admit = engine._admit

        def fail(group, slot_list, seeds, prefix):
            if len(group) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            admit(group, slot_list, seeds, prefix)

        engine._admit, splits, slots = fail, 2, 2
    else:  # once, mid-run: some rows are done, the others are halfway through their tokens
        run_steps = engine._run_steps

        def fail():
            calls["n"] += 1
            if calls["n"] == 3:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            run_steps()

        engine._run_steps, splits, slots = fail, 1, 4
    out = engine.generate(reqs, seed=5, keys=keys)
    assert same(out, reference)  # restarted rows draw the same samples: they depend on seed, id and step
    stats = engine.stats()
    assert (stats["oom_splits"], stats["oom_errors"], stats["slots"]) == (splits, 0, slots)
    if where == "prefill":
        assert engine.prefill_tokens == 16_384 // 4
    if where == "decode":
        assert calls["n"] > 3


def test_fast_engine_row_that_does_not_fit_one_slot_ends_in_error(loaded, reqs, single):
    engine = FastEngine(loaded, GREEDY, slots=1, steps_per_sync=4)
    admit, poison = engine._admit, reqs[7]

    def fail(group, slot_list, seeds, prefix):
        if any(r is poison for r in group):
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        admit(group, slot_list, seeds, prefix)

    engine._admit = fail
    out = engine.generate(reqs)
    assert out[7].finish_reason == "error" and "out of GPU memory" in out[7].error
    assert same(out[:7] + out[8:], single[:7] + single[8:])
    assert (engine.stats()["oom_errors"], engine.stats()["oom_splits"]) == (1, 0)


def test_fast_engine_kv_cache_of_one_slot_that_does_not_fit_names_the_memory(loaded, reqs):
    engine = FastEngine(loaded, GREEDY, slots=2)

    def fail(slots, max_len, blocks):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    engine._allocate = fail
    with pytest.raises(RuntimeError, match=r"KV cache even with one slot: \d+ tokens need \d+ MiB"):
        engine.generate(reqs)
    assert engine.stats()["oom_splits"] == 1  # 2 slots, then 1


@pytest.mark.parametrize("engine", ["batched", "fast"])
def test_job_manifest_counts_the_splits(tiny_lm, tmp_path, monkeypatch, engine):
    if engine == "batched":
        generate = BatchedGenerator._generate

        def fail(self, batch, requests):
            if len(batch) > 3:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            return generate(self, batch, requests)

        monkeypatch.setattr(BatchedGenerator, "_generate", fail)
    else:
        allocate = FastEngine._allocate

        def fail(self, slots, max_len, blocks):
            if slots > 4:  # the CPU plan is 16 slots: 16 -> 8 -> 4
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            allocate(self, slots, max_len, blocks)

        monkeypatch.setattr(FastEngine, "_allocate", fail)
    write_prompts(tmp_path / "in.parquet", 20)
    manifest = TextJob(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"), model=ModelSpec(tiny_lm),
                       params=GREEDY, chunk_rows=10, engine=engine).run()
    gc.collect()
    out = pd.read_parquet(tmp_path / "out")
    assert sorted(out.id) == list(range(20)) and out.error.isna().all() and out.output.notna().all()
    assert manifest["counts"]["errors"] == 0
    stats = manifest["engine_stats"]
    if engine == "batched":
        # chunk 1: 10 -> 5 + 5 -> 4 x 2-3 rows (3 splits); chunk 2 is batched by the shrunk budget
        assert stats["oom_splits"] >= 3 and stats["oom_errors"] == 0
    else:
        assert (stats["oom_splits"], stats["slots"], stats["oom_errors"]) == (2, 4, 0)


def test_fast_engine_admits_rows_block_by_block(loaded, reqs, single):
    # The job streams all chunks through one engine, with lookahead rows waiting. Longest first over the
    # whole window made the short rows of every chunk wait behind longer rows arriving later: no chunk
    # finished (no part could be written, and a retry had to redo everything) before the stream's end.
    # Within each block of `lookahead` arrivals it is still longest first.
    engine = FastEngine(loaded, GREEDY, slots=3, steps_per_sync=2)
    admit, order, arrival = engine._admit, [], {id(r): i for i, r in enumerate(reqs)}

    def spy(group, slot_list, seeds, prefix):
        order.extend(arrival[id(r)] for r in group)
        admit(group, slot_list, seeds, prefix)

    engine._admit = spy
    done = dict(engine.stream(((i, r, i) for i, r in enumerate(reqs)), lookahead=8))
    assert sorted(order) == list(range(len(reqs)))
    blocks = [i // 8 for i in order]
    assert blocks == sorted(blocks)
    first = order[:8]
    assert [len(reqs[i].input_ids) for i in first] == sorted((len(r.input_ids) for r in reqs[:8]), reverse=True)
    assert same([done[i] for i in range(len(reqs))], single)
