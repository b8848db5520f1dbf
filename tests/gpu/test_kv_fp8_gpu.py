"""An FP8 (e4m3) KV cache on a GPU: the Triton decode kernel reads it (a graph-captured decode, the job's
path), and greedy tokens stay close to those of the model's own dtype. bf16 weights of a tiny random Llama:
bf16 near-ties alone move some rows, so the bar is on the first tokens (each row's first token comes from
the prefill, which attends to fresh keys, and must agree everywhere)."""

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_fp8_kv_cache_through_the_decode_kernel_keeps_greedy_tokens(tmp_path):
    from airflow_hfllm.config import GenerationParams, ModelSpec
    from airflow_hfllm.engine.fast import FastEngine
    from airflow_hfllm.engine.loading import get_model
    from airflow_hfllm.testing.families import make_family_model
    from tests.conftest import chat_requests

    loaded = get_model(ModelSpec(str(make_family_model(tmp_path, "gemma3-text")), dtype="bfloat16"))
    reqs = chat_requests(loaded.tokenizer, 64, 32)
    params = GenerationParams(max_new_tokens=32, do_sample=False, logprobs=1)
    plain = FastEngine(loaded, params, slots=16).generate(reqs)
    engine = FastEngine(loaded, params, slots=16, kv_cache_dtype="fp8")
    assert engine.decoder.kernel is not None and engine.cuda_graphs
    fp8 = engine.generate(reqs)
    assert engine.k_cache[0].dtype == torch.float8_e4m3fn
    first = [a.top_logprobs[0]["id"] == b.top_logprobs[0]["id"] for a, b in zip(plain, fp8)]
    four = [[t["id"] for t in a.top_logprobs[:4]] == [t["id"] for t in b.top_logprobs[:4]] for a, b in zip(plain, fp8)]
    print(f"fp8 KV: first token agrees on {sum(first)}/64 rows, first four on {sum(four)}/64, whole text on "
          f"{sum(a.text == b.text for a, b in zip(plain, fp8))}/64")
    assert all(first) and sum(four) >= 0.75 * len(reqs)
