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


def test_an_fp8_kv_cache_holds_each_key_and_value_rounded_to_e4m3(loaded, monkeypatch):
    """kv_cache_dtype='fp8': an e4m3 cache (1 byte per element), every write (prefill, shared-prefix copy,
    decode step) its e4m3 rounding and every read that value: the same tokens as an engine whose cache keeps
    the model's dtype but rounds each write through e4m3. Prefill attends to its fresh keys, so each row's
    first token is the plain engine's. (How close FP8 keys come to bf16 on real weights: tests/gpu.)"""
    import torch

    from airflow_hfllm.engine import decoder
    from airflow_hfllm.engine.generate import Request

    prefix = loaded.tokenizer("a shared instruction that every row starts with, " * 4)["input_ids"]
    reqs = [Request(input_ids=prefix + r.input_ids, max_new_tokens=12)
            for r in chat_requests(loaded.tokenizer, 24, 12)]
    params = GenerationParams(max_new_tokens=12, do_sample=False, logprobs=1)
    engine = FastEngine(loaded, params, slots=6, steps_per_sync=3, kv_cache_dtype="fp8")
    fp8 = engine.generate(reqs)
    assert engine.k_cache[0].dtype == torch.float8_e4m3fn and engine.k_cache[0].element_size() == 1
    assert engine.stats()["prefix_tokens_saved"] > 0
    plain = FastEngine(loaded, params, slots=6, steps_per_sync=3).generate(reqs)

    def rounded_in_slots(x, cache):  # the shared prefix's own pass (a one-row buffer) is not the cache
        fp8 = x.clamp(-decoder.FP8_MAX, decoder.FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype)
        return fp8 if cache.shape[0] == 6 else x

    monkeypatch.setattr(decoder, "stored", rounded_in_slots)
    rounded = FastEngine(loaded, params, slots=6, steps_per_sync=3).generate(reqs)
    assert [c.top_logprobs for c in fp8] == [c.top_logprobs for c in rounded]
    assert [c.top_logprobs[0] for c in fp8] == [c.top_logprobs[0] for c in plain]
    assert [c.text for c in fp8] != [c.text for c in plain]  # the rounding is real: some rows go elsewhere
    with pytest.raises(ValueError, match="kv_cache_dtype must be"):
        FastEngine(loaded, params, kv_cache_dtype="int8")


def test_the_job_option_reaches_the_engine_and_the_fingerprint(tiny_lm, tmp_path, caplog):
    """``kv_cache_dtype`` from the job to the fast engine; it changes outputs, so it joins the output folder's
    fingerprint (a folder written with the model's dtype is rebuilt, not resumed, in FP8); batched
    generate() says it keeps the model's dtype."""
    import logging

    import torch

    from airflow_hfllm.config import JobConfig
    from airflow_hfllm.engine.loading import get_model
    from airflow_hfllm.run import engines
    from airflow_hfllm.run.kinds import TextKind

    loaded = get_model(ModelSpec(tiny_lm))

    def driver(**config):
        return engines.choose(TextKind(), loaded, GenerationParams(), JobConfig(**config),
                              should_stop=lambda: False, on_batch=lambda rows, tokens: None,
                              log=logging.getLogger("test"), model_name="tiny")

    assert driver(engine="fast", kv_cache_dtype="fp8").generator.kv_dtype == torch.float8_e4m3fn
    assert driver(engine="fast").generator.kv_dtype == loaded.model.dtype
    with caplog.at_level(logging.WARNING):
        driver(engine="batched", kv_cache_dtype="fp8")
    assert "batched generate() keeps the model's dtype" in caplog.text

    write_prompts(tmp_path / "in.parquet", 4)
    job = dict(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"), model=ModelSpec(tiny_lm),
               params=GenerationParams(max_new_tokens=4, do_sample=False), engine="fast")
    first = TextJob(**job).run()
    assert TextJob(**job).run()["fingerprint"] == first["fingerprint"]
    assert TextJob(**job, kv_cache_dtype="fp8").run()["fingerprint"] != first["fingerprint"]
