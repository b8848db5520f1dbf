"""Every model family of the fast engine, as a tiny random model of its own config loaded through
from_pretrained: greedy tokens equal transformers generate() exactly (CPU, fp32), with rows joining and
leaving slots; windowed families run sequences of at least 3x their window, and the longrope config's rows
start below and above its original context and cross it while decoding."""

import pytest

from airflow_hfllm.config import GenerationParams, ModelSpec
from airflow_hfllm.engine.arch import FAMILIES
from airflow_hfllm.engine.fast import FastEngine, unsupported_reason
from airflow_hfllm.engine.generate import BatchedGenerator
from airflow_hfllm.engine.kv_cache import BlockPool
from airflow_hfllm.engine.loading import get_model
from airflow_hfllm.testing.families import (FAMILY_CONFIGS, LONGROPE_CONTEXT, WINDOW, make_family_model,
                                            reference_params, to_mxfp4, window)
from tests.conftest import chat_requests

ROWS, NEW = 20, 40


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    root, built = tmp_path_factory.mktemp("families"), {}

    def get(family: str) -> str:
        if family not in built:
            built[family] = str(make_family_model(root / family, family))
        return built[family]

    return get


def equal_to_generate(loaded, family):
    assert FAMILIES[loaded.model.config.model_type].fast and unsupported_reason(loaded) is None
    requests = chat_requests(loaded.tokenizer, ROWS, NEW)
    params = GenerationParams(max_new_tokens=NEW, do_sample=False)
    reference = BatchedGenerator(loaded, reference_params(family, params), max_batch_size=1).generate(requests)
    assert sum(c.output_tokens >= 24 for c in reference) >= 0.8 * ROWS
    assert len({c.text for c in reference}) >= 0.9 * ROWS
    if window(family):  # most rows cross the window three times
        assert sum(len(r.input_ids) + c.output_tokens >= 3 * WINDOW for r, c in zip(requests, reference)) >= 0.9 * ROWS
    if family == "phi3-longrope":  # (prompt length, the last position a decode step ran at) of each row
        spans = [(len(r.input_ids), len(r.input_ids) + c.output_tokens - 2) for r, c in zip(requests, reference)]
        assert sum(last < LONGROPE_CONTEXT for _, last in spans) >= 3  # short factors only
        assert sum(prompt > LONGROPE_CONTEXT for prompt, _ in spans) >= 3  # long factors from the prompt on
        assert sum(prompt <= LONGROPE_CONTEXT <= last for prompt, last in spans) >= 3  # passing it while decoding

    fast = FastEngine(loaded, params, slots=5, steps_per_sync=3).generate(requests)  # rows join and leave
    assert [c.text for c in fast] == [c.text for c in reference]
    assert [c.finish_reason for c in fast] == [c.finish_reason for c in reference]
    # a paged cache (kv_blocks given) whose blocks hold about 3 rows at a time in 5 slots: rows wait for blocks
    blocks = 3 * max(BlockPool.need(len(r.input_ids) + NEW) for r in requests) + 1
    engine = FastEngine(loaded, params, slots=5, steps_per_sync=3, kv_blocks=blocks)
    assert [c.text for c in engine.generate(requests)] == [c.text for c in reference]
    assert engine.table.shape[0] == 5 and engine.k_cache[0].shape[0] == blocks


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_fast_engine_equals_generate(family_models, family):
    equal_to_generate(get_model(ModelSpec(family_models(family))), family)


def test_gpt_oss_in_mxfp4_is_dequantized_at_load(family_models, tmp_path):
    """gpt-oss ships MXFP4 experts: loaded to the load dtype, they run on the fast path."""
    import shutil

    import torch

    shutil.copytree(family_models("gpt-oss"), tmp_path / "mxfp4")
    to_mxfp4(tmp_path / "mxfp4")
    loaded = get_model(ModelSpec(str(tmp_path / "mxfp4")))
    bf16 = get_model(ModelSpec(family_models("gpt-oss")))
    a, b = (m.model.model.layers[0].mlp.experts.gate_up_proj for m in (loaded, bf16))
    assert a.dtype == torch.float32 and 0 < ((a - b).norm() / b.norm()).item() < 0.2  # 4-bit, dequantized
    equal_to_generate(loaded, "gpt-oss")


def test_longrope_rows_crossing_the_original_context(family_models, monkeypatch):
    """The rows that pass the original context while decoding: generate() recomputes their KV cache on the
    long factors (Phi-3's prepare_inputs_for_generation), and so does the engine, that step's token going
    through the penalties, the log-probabilities and a grammar as any other; with per-row factors alone (no
    row waiting for the recompute) every one of those rows gives other tokens than generate(). The reference
    runs without a cache (the whole sequence each step, as the recompute does: reference_params)."""
    from airflow_hfllm.engine.arch.longrope import LongRope

    family = "phi3-longrope"

    loaded = get_model(ModelSpec(family_models(family)))
    requests = [r for r in chat_requests(loaded.tokenizer, ROWS, NEW)
                if len(r.input_ids) <= LONGROPE_CONTEXT <= len(r.input_ids) + NEW - 2]

    def crossing(reference):
        return sum(len(r.input_ids) + c.output_tokens - 2 >= LONGROPE_CONTEXT for r, c in zip(requests, reference))

    params = GenerationParams(max_new_tokens=NEW, do_sample=False, repetition_penalty=1.1, presence_penalty=0.5,
                              frequency_penalty=0.3, logprobs=3)
    reference = BatchedGenerator(loaded, reference_params(family, params), max_batch_size=1).generate(requests)
    assert crossing(reference) == len(requests) >= 3
    fast = FastEngine(loaded, params, slots=2, steps_per_sync=4).generate(requests)
    assert [c.text for c in fast] == [c.text for c in reference]
    for a, b in zip(fast, reference):
        assert [t["logprob"] for t in a.top_logprobs] == pytest.approx([t["logprob"] for t in b.top_logprobs], abs=1e-4)
    # sentences of 10-40 characters: a token the matcher missed around the recompute would move the periods
    grammar = GenerationParams(max_new_tokens=NEW, do_sample=False, regex=r"([a-z ]{10,40}\.){3}")
    reference_under_grammar = BatchedGenerator(loaded, reference_params(family, grammar), max_batch_size=1).generate(
        requests)
    assert crossing(reference_under_grammar) >= 2
    fast = FastEngine(loaded, grammar, slots=2).generate(requests)
    assert [c.text for c in fast] == [c.text for c in reference_under_grammar]
    monkeypatch.setattr(LongRope, "waits", lambda self, positions: positions < 0)
    fast = FastEngine(loaded, params, slots=2, steps_per_sync=4).generate(requests)
    assert all(a.text != b.text for a, b in zip(fast, reference))


def test_models_left_out_say_why(family_models):
    loaded = get_model(ModelSpec(family_models("llama")))
    config = loaded.model.config
    rope = config.rope_parameters
    try:
        config.model_type = "falcon"
        reason = unsupported_reason(loaded)
        assert "not one of the fast engine's families" in reason and "docs/design.md" in reason
        config.model_type, config.quantization_config = "gpt_oss", {"quant_method": "mxfp4"}
        assert unsupported_reason(loaded) == "quantized weights (mxfp4)"
        del config.quantization_config
        config.model_type, config.rope_parameters = "llama", {**rope, "rope_type": "longrope"}
        assert unsupported_reason(loaded) == "rope type 'longrope' in llama"  # only Phi-3 recomputes its cache
    finally:
        config.model_type, config.rope_parameters = "llama", rope
        if hasattr(config, "quantization_config"):
            del config.quantization_config
    assert unsupported_reason(loaded) is None


@pytest.mark.parametrize("family, per_layer, fp8", [
    ("llama", 2, False), ("qwen2-window", 2, False), ("gemma3-text", 2, False), ("qwen3-moe", 1, False),
    ("gpt-oss", 1, False), ("phi3", 0, False), ("llama", 2, True), ("qwen2-window", 2, True)])
def test_fused_projections_compute_the_same(family_models, family, per_layer, fp8):
    """The GPU's fused q/k/v and gate/up (engine/arch/fuse.py), checked on the CPU: the layer code gives the
    same logits through them as through the separate projections, the model's own forward is unchanged
    (its modules read views of the fused matrices), and no parameter is added."""
    import torch
    from transformers import AutoModelForCausalLM

    from airflow_hfllm.engine.arch.fuse import fuse_projections
    from airflow_hfllm.engine.decoder import Decoder

    model = AutoModelForCausalLM.from_pretrained(family_models(family)).eval()  # not the cached one: fused below
    if fp8:
        from airflow_hfllm.engine.fp8 import quantize_model

        quantize_model(model)
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    n, t = ids.shape

    def logits():
        decoder = Decoder(model, kernel=False)
        cache = lambda: [torch.zeros(n, decoder.kv_heads, t, decoder.head_dim) for _ in decoder.layers]  # noqa: E731
        with torch.no_grad():
            return (decoder.prefill(cache(), cache(), decoder.base.embed_tokens(ids), torch.arange(t).expand(n, t),
                                    torch.full((n,), t), torch.arange(n)), model(ids).logits)

    layer_code, forward = logits()
    size = sum(p.numel() for p in model.parameters())
    assert fuse_projections(model) == per_layer * model.config.num_hidden_layers
    assert fuse_projections(model) == 0  # once only
    assert sum(p.numel() for p in model.parameters()) == size
    fused, forward_after = logits()
    assert torch.allclose(fused, layer_code, atol=1e-5, rtol=1e-5)
    assert torch.equal(forward_after, forward)


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])
def test_verdict_pass_equals_the_model(family_models, family):
    """The Llama Guard verdict pass (the last token's logits, through the layer code) on other families:
    those whose last layer is not Llama's run it whole."""
    import torch

    from airflow_hfllm.engine.arch.layer import padded
    from airflow_hfllm.safety.verdict_pass import VerdictPass

    loaded = get_model(ModelSpec(family_models(family)))
    rows = [r.input_ids for r in chat_requests(loaded.tokenizer, 4, 1)]
    ids, lengths = padded(rows), torch.tensor([len(r) for r in rows])
    heads, kv, hd = VerdictPass(loaded, compile=False).dims
    empty = [(torch.zeros(1, kv, 0, hd), torch.zeros(1, kv, 0, hd))] * len(loaded.model.model.layers)
    with torch.inference_mode():
        got = VerdictPass(loaded, compile=False).logits(ids, lengths, empty)
        want = torch.stack([loaded.model(torch.tensor([r])).logits[0, -1].float() for r in rows])
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
