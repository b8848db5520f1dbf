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


@pytest.mark.parametrize("family", ["llama", "gemma3-text"])
def test_paged_cache_compiled_and_in_fp8(tmp_path, family, no_tf32):
    """The paths the paged default now reaches where memory is tight: the compiled decoder over a paged cache
    (fp32: the same tokens as the compiled static one), and an FP8 paged cache (bf16 weights: the first
    token of every row as the bf16 paged cache's, as ``test_kv_fp8_gpu.py`` holds for the static one)."""
    from airflow_hfllm.config import GenerationParams, ModelSpec
    from airflow_hfllm.engine.fast import FastEngine
    from airflow_hfllm.engine.loading import get_model
    from airflow_hfllm.testing.families import make_family_model
    from tests.conftest import chat_requests

    path = str(make_family_model(tmp_path, family))
    loaded = get_model(ModelSpec(path, dtype="float32"))
    reqs = chat_requests(loaded.tokenizer, 64, 32)
    params = GenerationParams(max_new_tokens=32, do_sample=False)
    static = FastEngine(loaded, params, slots=16, compile=True).generate(reqs)
    engine = FastEngine(loaded, params, slots=16, paged=True, compile=True)
    paged = engine.generate(reqs)
    assert engine.table is not None and engine.decoder.compiler.enabled and engine.cuda_graphs
    same = sum(a.text == b.text for a, b in zip(paged, static))
    print(f"{family} compiled: {same}/64 rows of the paged cache equal the static cache's")
    assert same >= 0.95 * len(reqs)

    loaded = get_model(ModelSpec(path, dtype="bfloat16"))
    params = GenerationParams(max_new_tokens=32, do_sample=False, logprobs=1)
    plain = FastEngine(loaded, params, slots=16, paged=True).generate(reqs)
    engine = FastEngine(loaded, params, slots=16, paged=True, kv_cache_dtype="fp8")
    fp8 = engine.generate(reqs)
    assert engine.table is not None and engine.k_cache[0].dtype == torch.float8_e4m3fn
    first = [a.top_logprobs[0]["id"] == b.top_logprobs[0]["id"] for a, b in zip(plain, fp8)]
    print(f"{family} fp8 paged: first token agrees on {sum(first)}/64 rows, whole text on "
          f"{sum(a.text == b.text for a, b in zip(plain, fp8))}/64")
    assert all(first) and sum(a.text[:8] == b.text[:8] for a, b in zip(plain, fp8)) >= 0.75 * len(reqs)


def test_vision_on_a_paged_cache(tmp_path, no_tf32):
    """Qwen3-VL (images expanded into a row's blocks once they are ready, multimodal rope offsets) on a paged
    cache of few blocks, with CUDA graphs: the static cache's greedy tokens, fp32."""
    from airflow_hfllm.engine.kv_cache import BlockPool
    from airflow_hfllm.testing.vision import make_tiny_vision_model
    from airflow_hfllm.vision.fast import VisionFastEngine
    from tests.unit.test_qwen3_vl import setup

    model = str(make_tiny_vision_model(tmp_path / "qwen3_vl", family="qwen3_vl"))
    loaded, processor, loader, params, requests = setup(model, "float32")
    fresh = setup(model, "float32")[-1]  # placeholders not yet expanded
    assert loaded.model.dtype == torch.float32 and loaded.model.device.type == "cuda"
    static = VisionFastEngine(loaded, params, processor, loader, slots=5, steps_per_sync=3).generate(requests)
    blocks = 2 * BlockPool.need(max(len(r.input_ids) + r.max_new_tokens for r in requests)) + 1
    engine = VisionFastEngine(loaded, params, processor, loader, slots=5, steps_per_sync=3, paged=True,
                              kv_blocks=blocks)
    paged = engine.generate(fresh)
    assert engine.table is not None and engine.cuda_graphs and engine.decoder.kernel is not None
    assert sum(c.output_tokens >= 24 for c in static) >= 0.8 * len(static)  # not vacuous
    same = sum(a.text == b.text for a, b in zip(paged, static))
    print(f"qwen3_vl: {same}/{len(static)} rows of the paged cache equal the static cache's")
    assert same >= 0.95 * len(static)
