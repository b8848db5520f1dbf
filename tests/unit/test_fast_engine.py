"""The fast engine's scheduling, KV cache and sampling, run eagerly on the CPU (no CUDA graphs)."""

import pandas as pd
import pytest

from airflow_hfllm.engine.fast import FastEngine, unsupported_reason
from airflow_hfllm.engine.generate import BatchedGenerator, Cancelled
from airflow_hfllm.config import GenerationParams, ModelSpec
from airflow_hfllm.run.job import TextJob
from tests.conftest import chat_requests, write_prompts


def test_greedy_equals_transformers_generate(loaded):
    assert unsupported_reason(loaded) is None
    reqs = chat_requests(loaded.tokenizer, 80, lambda i: (24, 5, 17, 1)[i % 4])
    params = GenerationParams(max_new_tokens=24, do_sample=False)
    reference = BatchedGenerator(loaded, params, max_batch_size=1).generate(reqs)
    long_rows = [c for c, r in zip(reference, reqs) if r.max_new_tokens == 24]
    assert sum(c.output_tokens >= 8 for c in long_rows) >= 15 and len({c.text for c in reference}) >= 70

    # 6 slots for 80 rows: rows leave and join the running batch all the time.
    fast = FastEngine(loaded, params, slots=6, steps_per_sync=3).generate(reqs)
    assert [c.text for c in fast] == [c.text for c in reference]
    assert [c.output_tokens for c in fast] == [c.output_tokens for c in reference]
    assert [c.finish_reason for c in fast] == [c.finish_reason for c in reference]


def test_sampling_depends_on_seed_and_id_only(loaded):
    reqs = chat_requests(loaded.tokenizer, 30, 24)
    params = GenerationParams(max_new_tokens=16, do_sample=True, temperature=1.0, top_p=0.9, top_k=40,
                              repetition_penalty=1.3, min_length=6)
    keys = [f"row-{i}" for i in range(30)]
    a = FastEngine(loaded, params, slots=8).generate(reqs, seed=0, keys=keys)
    b = FastEngine(loaded, params, slots=3, steps_per_sync=5).generate(reqs, seed=0, keys=keys)
    assert [c.text for c in a] == [c.text for c in b]
    # the same row alone gets the same sample
    alone = FastEngine(loaded, params, slots=1).generate([reqs[7]], seed=0, keys=[keys[7]])
    assert alone[0].text == a[7].text
    assert all(c.output_tokens >= 6 for c in a)  # min_length holds EOS back
    other = FastEngine(loaded, params, slots=8).generate(reqs, seed=1, keys=keys)
    assert sum(x.text != y.text for x, y in zip(a, other)) >= 25
    greedy = FastEngine(loaded, params.replace(do_sample=False), slots=8).generate(reqs)
    assert sum(x.text != y.text for x, y in zip(a, greedy)) >= 25


def test_stop_strings_and_cancel(loaded):
    reqs = chat_requests(loaded.tokenizer, 4, 24)
    params = GenerationParams(max_new_tokens=20, do_sample=False)
    full = FastEngine(loaded, params, slots=4).generate(reqs)
    row = next(c for c in full if len(c.text.split()) >= 3)
    stop = row.text.split()[2]
    cut = FastEngine(loaded, params.replace(stop=(stop,)), slots=4).generate(reqs)[full.index(row)]
    assert cut.finish_reason == "stop" and stop not in cut.text and row.text.startswith(cut.text)
    with pytest.raises(Cancelled):
        FastEngine(loaded, params, slots=2, should_stop=lambda: True).generate(reqs)


def test_job_with_fast_engine(tiny_lm, tmp_path):
    write_prompts(tmp_path / "in.parquet", 30)
    greedy = GenerationParams(max_new_tokens=10, do_sample=False)
    run = lambda engine, out: TextJob(input=str(tmp_path / "in.parquet"), output=str(tmp_path / out),  # noqa: E731
                                      model=ModelSpec(tiny_lm), params=greedy, chunk_rows=8, engine=engine).run()
    fast, batched = run("fast", "fast"), run("batched", "batched")
    assert fast["engine"] == "fast" and batched["engine"] == "batched-generate"
    assert fast["counts"] == batched["counts"]
    a = pd.read_parquet(tmp_path / "fast").sort_values("id")
    b = pd.read_parquet(tmp_path / "batched").sort_values("id")
    assert a.output.tolist() == b.output.tolist()


def test_job_streams_rows_across_chunks(tiny_lm, tmp_path):
    """Chunks smaller than the slot count: rows of several chunks share the running batch, parts are
    still whole chunks, and the results equal the batched path's."""
    df = write_prompts(tmp_path / "in.parquet", 40)
    df.loc[5, "prompt"] = None  # a chunk with an error row
    df.to_parquet(tmp_path / "in.parquet", index=False)
    greedy = GenerationParams(max_new_tokens=10, do_sample=False)

    def run(engine, out):
        return TextJob(input=str(tmp_path / "in.parquet"), output=str(tmp_path / out), model=ModelSpec(tiny_lm),
                       params=greedy, chunk_rows=3, batch_size=16, engine=engine, max_error_rate=0.5).run()

    fast = run("fast", "fast")
    assert fast["engine"] == "fast" and len(fast["parts"]) == 14
    assert run("batched", "batched")["engine"] == "batched-generate"
    a = pd.read_parquet(tmp_path / "fast").sort_values("id").reset_index(drop=True)
    b = pd.read_parquet(tmp_path / "batched").sort_values("id").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    assert a.error.notna().sum() == 1
    for k in range(14):
        part = pd.read_parquet(tmp_path / "fast" / f"part-{k:05d}.parquet")
        assert part.id.tolist() == list(range(3 * k, min(3 * k + 3, 40)))
