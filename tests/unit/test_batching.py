"""Batching must not change results: batched greedy output == one prompt at a time."""

from airflow_hfllm.engine.generate import BatchedGenerator, Request
from airflow_hfllm.engine.loading import get_model
from airflow_hfllm.engine.prompts import encode
from airflow_hfllm.config import GenerationParams, ModelSpec
from tests.conftest import prompt_text


def test_batched_greedy_equals_one_at_a_time(tiny_lm):
    loaded = get_model(ModelSpec(tiny_lm))
    params = GenerationParams(max_new_tokens=24, do_sample=False)
    requests = [Request(encode(loaded.tokenizer, [{"role": "user", "content": prompt_text(i)}]), 24)
                for i in range(200)]
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
    requests = [Request(encode(tok, [{"role": "user", "content": prompt_text(i)}]), 4 if i % 2 else 20)
                for i in range(10)]
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
