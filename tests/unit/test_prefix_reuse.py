"""Shared-prefix reuse (issue 18): rows that start with the same long prefix compute its keys and values once;
outputs stay those of generate() and of the engine without reuse (CPU, fp32)."""

import pytest

from airflow_hfllm.config import GenerationParams, ModelSpec
from airflow_hfllm.engine.fast import FastEngine
from airflow_hfllm.engine.generate import BatchedGenerator, Request
from airflow_hfllm.engine.loading import get_model
from airflow_hfllm.engine.prefix import MIN_TOKENS, PrefixCache
from airflow_hfllm.engine.prompts import encode
from airflow_hfllm.testing.families import make_family_model
from tests.conftest import prompt_text

NEW = 24


def requests(tokenizer, n: int, systems: list[str]) -> list[Request]:
    """``n`` chats whose system message cycles through ``systems`` ("" for none), with their own user text."""
    out = []
    for i in range(n):
        system = systems[i % len(systems)]
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt_text(i)}]
        out.append(Request(encode(tokenizer, messages), NEW - i % 5))
    return out


INSTRUCTIONS = " ".join(prompt_text(1000 + k) for k in range(3))  # well over MIN_TOKENS once encoded
OTHER = "Answer in one word. " + prompt_text(2001)


def test_split_finds_the_prefix_that_saves_most_and_keeps_a_few():
    cache, computed = PrefixCache(), []

    def compute(ids):
        computed.append(len(ids))
        return len(ids)

    a, b = list(range(100)), list(range(1000, 1080))
    group = [a + [5000 + i] * 3 for i in range(3)] + [[7] * 90]
    window = [a + [6000 + i] * 4 for i in range(4)] + [a[:70] + [9] * 40] + [b + [1, 2], b + [3]]
    parts = cache.split(group, window, compute)
    assert computed == [100]  # not 70: 100 tokens x 7 rows save more than 70 x 8
    assert sorted((len(p.ids) if p else 0, rows) for p, rows in parts) == [(0, [3]), (100, [0, 1, 2])]
    assert cache.cost(a + [1, 2]) == 2 and cache.cost(b + [1]) == 81
    parts = cache.split([b + [4], b + [5, 6]], [], compute)  # a second prefix joins the first
    assert computed == [100, 80] and [len(e.ids) for e in cache.entries] == [100, 80]
    assert [(len(p.ids), rows) for p, rows in parts] == [(80, [0, 1])]
    assert cache.split([a + [8]], [], compute)[0][0].ids == a and len(computed) == 2
    assert cache.stats() == {"prefix_tokens_saved": 100 * 4 + 80 * 2 - 180, "prefixes_computed": 2}
    for k in range(5):  # the oldest go first
        cache.split([[k] * 70 + [1], [k] * 70 + [2]], [], compute)
    assert len(cache.entries) == 4 and cache.match(a + [1]) is None
    assert PrefixCache().split([[1] * 80 + [2], [1] * 60 + [3] * 30], [], compute)[0][0] is None  # 60 < MIN_TOKENS
    assert PrefixCache(enabled=False).split(group, window, compute) == [(None, [0, 1, 2, 3])]


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    root, built = tmp_path_factory.mktemp("prefix"), {}

    def get(family: str):
        if family not in built:
            built[family] = get_model(ModelSpec(str(make_family_model(root / family, family))))
        return built[family]

    return get


# llama: plain; mistral-window: a prefix longer than the window; gemma3-text: local and global layers with
# their own rope bases; gpt-oss: attention sinks
@pytest.mark.parametrize("family", ["llama", "mistral-window", "gemma3-text", "gpt-oss"])
def test_reuse_equals_generate(family_models, family):
    loaded = family_models(family)
    reqs = requests(loaded.tokenizer, 18, [INSTRUCTIONS])
    assert len(reqs[0].input_ids) - len(encode(loaded.tokenizer, [{"role": "user", "content": prompt_text(0)}])) \
        >= MIN_TOKENS
    params = GenerationParams(max_new_tokens=NEW, do_sample=False)
    reference = BatchedGenerator(loaded, params, max_batch_size=1).generate(reqs)
    assert len({c.text for c in reference}) >= 16 and sum(c.output_tokens >= 16 for c in reference) >= 14
    engine = FastEngine(loaded, params, slots=5, steps_per_sync=3, prefill_tokens=1200)
    fast = engine.generate(reqs)
    assert [c.text for c in fast] == [c.text for c in reference]
    stats = engine.stats()
    assert stats["prefixes_computed"] == 1
    assert stats["prefix_tokens_saved"] >= 17 * MIN_TOKENS
    # the prefix copied into each row's own blocks of a paged cache
    paged = FastEngine(loaded, params, slots=5, steps_per_sync=3, prefill_tokens=1200, paged=True)
    assert [c.text for c in paged.generate(reqs)] == [c.text for c in reference]
    assert paged.table is not None and paged.stats()["prefixes_computed"] == 1


def test_mixed_prefixes_and_penalties_equal_no_reuse(loaded):
    """Rows of two system prompts and rows of none, sampled with penalties that count the prompt's tokens:
    every row's sample is the one it gets without reuse."""
    reqs = requests(loaded.tokenizer, 30, [INSTRUCTIONS, INSTRUCTIONS, OTHER, ""])
    params = GenerationParams(max_new_tokens=NEW, do_sample=True, temperature=1.0, top_k=40,
                              repetition_penalty=1.3)
    keys = [f"row-{i}" for i in range(len(reqs))]
    off = FastEngine(loaded, params, slots=6, prefix_reuse=False)
    on = FastEngine(loaded, params, slots=6, prefill_tokens=900)
    plain, reused = off.generate(reqs, seed=3, keys=keys), on.generate(reqs, seed=3, keys=keys)
    assert [c.text for c in reused] == [c.text for c in plain]
    assert off.stats()["prefix_tokens_saved"] == 0 and on.stats()["prefix_tokens_saved"] > 0
    assert on.stats()["prefixes_computed"] >= 1


def test_job_manifest_counts_the_prefix_tokens_saved(tiny_lm, tmp_path):
    """A job whose rows share a long system prompt: its manifest says how much prefill the reuse saved, and
    its outputs are those of the batched engine."""
    import pandas as pd

    from airflow_hfllm.run.job import TextJob
    from tests.conftest import write_prompts

    write_prompts(tmp_path / "in.parquet", 24)
    greedy = GenerationParams(max_new_tokens=8, do_sample=False)

    def run(engine: str) -> dict:
        return TextJob(input=str(tmp_path / "in.parquet"), output=str(tmp_path / engine), model=ModelSpec(tiny_lm),
                       params=greedy, chunk_rows=8, engine=engine, system_prompt=INSTRUCTIONS).run()

    fast, batched = run("fast"), run("batched")
    assert fast["engine_stats"]["prefixes_computed"] == 1
    assert fast["engine_stats"]["prefix_tokens_saved"] >= 23 * MIN_TOKENS
    a, b = (pd.read_parquet(tmp_path / e).sort_values("id").output.tolist() for e in ("fast", "batched"))
    assert a == b
