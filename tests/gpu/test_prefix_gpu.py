"""Shared-prefix reuse on a GPU: in bf16 the suffix prefill runs SDPA's flash kernel with lower-right causal
alignment and GQA (fp32 falls back to a materialized mask); logits after the prefix match a whole-prompt
prefill and greedy outputs agree with the engine without reuse. Run with ``-s`` to see the rates."""

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("family, dtype", [("llama", "bfloat16"), ("qwen3", "bfloat16"), ("gemma3-text", "bfloat16"),
                                           ("gpt-oss", "bfloat16"), ("llama", "float32")])
def test_reuse_agrees_with_whole_prompts(tmp_path, family, dtype):
    from airflow_hfllm.config import GenerationParams, ModelSpec
    from airflow_hfllm.engine.fast import FastEngine
    from airflow_hfllm.engine.loading import get_model
    from airflow_hfllm.testing.families import make_family_model
    from tests.unit.test_prefix_reuse import INSTRUCTIONS, OTHER, requests

    torch.backends.cuda.matmul.allow_tf32 = False
    loaded = get_model(ModelSpec(str(make_family_model(tmp_path / family, family)), dtype=dtype))
    reqs = requests(loaded.tokenizer, 96, [INSTRUCTIONS, OTHER])
    params = GenerationParams(max_new_tokens=24, do_sample=False)
    plain = FastEngine(loaded, params, slots=32, prefix_reuse=False).generate(reqs)
    engine = FastEngine(loaded, params, slots=32)
    reused = engine.generate(reqs)
    stats = engine.stats()
    rate = sum(a.text == b.text for a, b in zip(plain, reused)) / len(reqs)
    print(f"\n{family} {dtype}: {rate:.0%} of {len(reqs)} rows agree; {stats['prefixes_computed']} prefixes, "
          f"{stats['prefix_tokens_saved']} prompt tokens' prefill saved")
    assert stats["prefixes_computed"] == 2 and stats["prefix_tokens_saved"] > 0
    assert rate >= (0.95 if dtype == "float32" else 0.8)
