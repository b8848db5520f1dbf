"""A paged KV cache on a GPU (``FastEngine(paged=True)``): rows' keys in blocks anywhere in the cache, found
through each slot's table by the Triton decode kernel inside the captured decode graph. In fp32 with TF32
off the paged engine computes what the static one does: the same greedy tokens on at least 95% of rows (on
all, where both admit rows alike; with fewer blocks than the slots could use, rows wait for blocks and
prefill in other groups, whose GEMMs may round otherwise), with a window shorter than the rows too (Gemma
3's local layers)."""

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("family", ["llama", "gemma3-text"])
def test_paged_engine_equals_the_static_one(tmp_path, family, no_tf32):
    from airflow_hfllm.config import GenerationParams, ModelSpec
    from airflow_hfllm.engine.fast import FastEngine
    from airflow_hfllm.engine.kv_cache import BlockPool
    from airflow_hfllm.engine.loading import get_model
    from airflow_hfllm.testing.families import make_family_model
    from tests.conftest import chat_requests

    loaded = get_model(ModelSpec(str(make_family_model(tmp_path, family)), dtype="float32"))
    reqs = chat_requests(loaded.tokenizer, 64, 48)
    params = GenerationParams(max_new_tokens=48, do_sample=False)
    static = FastEngine(loaded, params, slots=16).generate(reqs)
    for blocks in (None, 4 * max(BlockPool.need(len(r.input_ids) + 48) for r in reqs) + 1):
        engine = FastEngine(loaded, params, slots=16, paged=True, kv_blocks=blocks)
        assert engine.decoder.kernel is not None and engine.cuda_graphs
        paged = engine.generate(reqs)
        assert engine.table is not None
        same = sum(a.text == b.text for a, b in zip(paged, static))
        print(f"{family}, {blocks or 'default'} blocks: {same}/{len(reqs)} rows equal the static cache's")
        assert same >= 0.95 * len(reqs)


def test_the_engine_pages_where_memory_limits_the_slots(tmp_path, no_tf32):
    """``paged=None`` (the default) keeps a static cache where free memory holds the most slots the engine
    takes, and pages where it holds fewer (here the GPU is filled but for about 64 static slots and the
    room ``plan`` keeps for prefill); the greedy tokens stay the static cache's."""
    from airflow_hfllm.config import GenerationParams, ModelSpec
    from airflow_hfllm.engine.cache import free_memory
    from airflow_hfllm.engine.fast import FastEngine
    from airflow_hfllm.engine.generate import kv_bytes_per_token
    from airflow_hfllm.engine.kv_cache import MAX_SLOTS, width
    from airflow_hfllm.engine.loading import get_model
    from airflow_hfllm.engine.scheduler import tokens
    from airflow_hfllm.testing.families import make_family_model
    from tests.conftest import chat_requests

    loaded = get_model(ModelSpec(str(make_family_model(tmp_path, "llama")), dtype="float32"))
    reqs = chat_requests(loaded.tokenizer, 128, 48)
    params = GenerationParams(max_new_tokens=48, do_sample=False)
    roomy = FastEngine(loaded, params)
    static = roomy.generate(reqs)
    assert not roomy.paged and roomy._shape[0] == MAX_SLOTS
    size = width(max(map(tokens, reqs)), paged=False)
    slot = size * (kv_bytes_per_token(loaded.model, torch.float32) + 8) + 8 * roomy.vocab
    del roomy
    free_memory()
    free, _ = torch.cuda.mem_get_info()
    filler = torch.empty(int(free - 6 * 2**30 - 64 * slot / 0.85), dtype=torch.uint8, device="cuda")
    try:
        tight = FastEngine(loaded, params)
        paged = tight.generate(reqs)
        print(f"filled: {tight._shape[0]} slots, {tight._shape[2]} blocks")
        assert tight.paged and tight._shape[0] > 64
        assert sum(a.text == b.text for a, b in zip(paged, static)) >= 0.95 * len(reqs)
    finally:
        del filler
        free_memory()
