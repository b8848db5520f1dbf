"""The CUDA path on a real GPU (run on the lent device; skipped where there is no GPU, e.g. CI)."""

import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from airflow_hfllm.engine.generate import BatchedGenerator, Request  # noqa: E402
from airflow_hfllm.engine.loading import get_model  # noqa: E402
from airflow_hfllm.engine.prompts import encode  # noqa: E402
from airflow_hfllm.config import GenerationParams, ModelSpec  # noqa: E402
from airflow_hfllm.run.job import TextJob  # noqa: E402
from tests.conftest import prompt_text, write_prompts  # noqa: E402


def test_job_on_gpu_in_bf16(tiny_lm, tmp_path):
    write_prompts(tmp_path / "in.parquet", 64)
    manifest = TextJob(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"), model=ModelSpec(tiny_lm),
                       params=GenerationParams(max_new_tokens=16, do_sample=True, seed=3), chunk_rows=32).run()
    assert manifest["device"].startswith("cuda") and manifest["peak_gpu_memory_bytes"] > 0
    out = pd.read_parquet(tmp_path / "out")
    assert len(out) == 64 and out.output.notna().all()
    loaded = get_model(ModelSpec(tiny_lm))
    assert loaded.model.dtype == torch.bfloat16 and loaded.model.device.type == "cuda"


def test_batched_equals_single_on_gpu_fp32(tiny_lm):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    loaded = get_model(ModelSpec(tiny_lm, dtype="float32"))
    params = GenerationParams(max_new_tokens=24, do_sample=False)
    requests = [Request(encode(loaded.tokenizer, [{"role": "user", "content": prompt_text(i)}]), 24)
                for i in range(128)]
    single = BatchedGenerator(loaded, params, max_batch_size=1).generate(requests)
    batched = BatchedGenerator(loaded, params, max_batch_size=64).generate(requests)
    assert len({c.text for c in single}) >= 100 and sum(c.output_tokens >= 8 for c in single) >= 110
    agree = sum(a.text == b.text for a, b in zip(single, batched))
    assert agree >= 0.95 * len(requests)
