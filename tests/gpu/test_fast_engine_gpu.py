"""Fast engine vs transformers generate() on a GPU, with a random-weight model of Qwen2-0.5B shape.

fp32 with TF32 off: the first 32 greedy tokens agree for >= 95% of rows. bf16 agreement is printed
(near-ties on random weights make exact bf16 agreement meaningless). Run with ``-s`` to see rates.
"""

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def agreement(dtype: str, n: int = 64, new: int = 32) -> float:
    from airflow_hfllm.engine.fast import FastEngine
    from airflow_hfllm.engine.generate import BatchedGenerator
    from airflow_hfllm.config import GenerationParams
    from benchmarks.throughput import build, workload

    loaded = build("0.5b", dtype)
    requests = workload("standard", n)
    for r in requests:
        r.max_new_tokens = new
    params = GenerationParams(max_new_tokens=new, do_sample=False)
    reference = BatchedGenerator(loaded, params, max_batch_size=1).generate(requests)
    fast = FastEngine(loaded, params, slots=16, steps_per_sync=8).generate(requests)
    assert all(c.output_tokens == new for c in reference)
    assert len({c.text for c in reference}) == n  # long and varied
    rate = sum(a.text == b.text for a, b in zip(reference, fast)) / n
    print(f"\n{dtype}: first {new} greedy tokens agree for {rate:.0%} of {n} rows")
    del loaded
    torch.cuda.empty_cache()
    return rate


def test_fp32_agreement():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    assert agreement("float32") >= 0.95


def test_bf16_agreement_reported():
    # Measured 39% (H200) and 38% (H100) on 2026-11-26: near-ties on random weights. A broken bf16 path
    # (rotary, cache writes, masks) diverges from the first tokens on and agrees for ~0% of rows.
    assert agreement("bfloat16") >= 0.2
