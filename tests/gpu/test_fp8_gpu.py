"""quantization="fp8" on a GPU with FP8 tensor cores: Fp8Linear's rowwise ``_scaled_mm`` against its
dequantized weights, eager and replayed from a CUDA graph; the fast engine (CUDA graphs) against
generate() on the same FP8 model; a pre-quantized fine-grained FP8 checkpoint kept in FP8 by the loader.
fp32 activations with TF32 off, as in test_families_gpu.py: the FP8 matmul writes bf16, whose rounding
can differ with the batch's row count between the two paths, so rows are compared by rate (printed with
``-s``)."""

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                                 reason="needs FP8 tensor cores (compute capability 8.9+)")]


def test_linear_matches_its_dequantized_weights_in_a_cuda_graph():
    from airflow_hfllm.engine.fp8 import Fp8Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(4096, 1024, device="cuda", dtype=torch.bfloat16)
    fp8 = Fp8Linear.from_linear(linear)
    assert fp8.scaled_mm and fp8.weight.dtype == torch.float8_e4m3fn
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    x[:, :4] *= 20  # outlier channels
    reference = torch.nn.functional.linear(x.float(), fp8.weight.float() * fp8.weight_scale[:, None],
                                           linear.bias.float())
    eager = fp8(x)
    error = ((eager.float() - reference).norm() / reference.norm()).item()
    print(f"\nFp8Linear vs its dequantized weights: relative error {error:.4f}")
    assert eager.dtype == torch.bfloat16 and error < 0.05

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fp8(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = fp8(x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(replayed, eager)


def agreement(loaded, n: int = 64, new: int = 32) -> float:
    from airflow_hfllm.config import GenerationParams
    from airflow_hfllm.engine.fast import FastEngine, unsupported_reason
    from airflow_hfllm.engine.generate import BatchedGenerator, Request
    from airflow_hfllm.engine.prompts import encode
    from tests.conftest import prompt_text

    assert loaded.device.type == "cuda" and unsupported_reason(loaded) is None
    requests = [Request(encode(loaded.tokenizer, [{"role": "user", "content": prompt_text(i)}]), new)
                for i in range(n)]
    params = GenerationParams(max_new_tokens=new, do_sample=False)
    reference = BatchedGenerator(loaded, params, max_batch_size=1).generate(requests)
    assert len({c.text for c in reference}) >= 0.9 * n
    engine = FastEngine(loaded, params, slots=16, steps_per_sync=8)
    fast = engine.generate(requests)
    assert engine.capture_seconds > 0  # the CUDA graph ran
    return sum(a.text == b.text for a, b in zip(reference, fast)) / n


@pytest.fixture
def fp32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def test_fast_engine_on_an_fp8_model_agrees_with_generate(tmp_path, fp32):
    from airflow_hfllm.config import ModelSpec
    from airflow_hfllm.engine.fp8 import Fp8Linear
    from airflow_hfllm.engine.loading import load
    from airflow_hfllm.testing.families import make_family_model

    loaded = load(ModelSpec(str(make_family_model(tmp_path / "llama", "llama")), dtype="float32",
                            quantization="fp8"))
    assert isinstance(loaded.model.model.layers[0].mlp.down_proj, Fp8Linear)
    rate = agreement(loaded)
    print(f"\nfp8 llama: first 32 greedy tokens of the fast engine agree with generate() for {rate:.0%} of rows")
    assert rate >= 0.9


def test_a_fine_grained_fp8_checkpoint_stays_fp8(tmp_path, fp32):
    from airflow_hfllm.config import ModelSpec
    from airflow_hfllm.engine.fp8 import Fp8Linear
    from airflow_hfllm.engine.loading import load
    from airflow_hfllm.testing.families import make_family_model, to_fine_grained_fp8

    path = make_family_model(tmp_path / "llama", "llama")
    to_fine_grained_fp8(path)
    loaded = load(ModelSpec(str(path), dtype="float32"))
    layer = loaded.model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, Fp8Linear) and layer.self_attn.q_proj.weight.dtype == torch.float8_e4m3fn
    assert loaded.model.lm_head.weight.dtype == torch.float32  # the checkpoint's lm_head is not FP8
    rate = agreement(loaded)
    print(f"\nfine-grained FP8 checkpoint: fast engine vs generate() agree for {rate:.0%} of rows")
    assert rate >= 0.9
