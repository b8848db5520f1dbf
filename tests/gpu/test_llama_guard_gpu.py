"""The Llama Guard checker compiled (torch.compile, dynamic shapes; the default on CUDA for a caller that
says nothing of its size) vs eager; the lean verdict pass against transformers' forward, in bf16."""

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from tests.unit.test_llama_guard import TEXTS, guard  # noqa: E402


def test_compiled_checker_gives_the_eager_scores(models):
    # fp32 with TF32 off: in bf16 the tiny random model's scores move by up to ~0.03 with any change of
    # rounding (fused or not), which would hide a real difference.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    eager = guard(models, None, compile=False, dtype="float32")
    compiled = guard(models, None, dtype="float32")
    assert eager.load().device.type == "cuda"
    for kind, context in (("prompt", None), ("output", TEXTS[::-1])):
        for texts, ctx in ((TEXTS, context), (TEXTS[:3], context[:3] if context else None)):  # two shapes
            a = [v.score for v in eager.check(texts, kind, ctx)]
            b = [v.score for v in compiled.check(texts, kind, ctx)]
            assert compiled.compiled  # it compiled, and stayed compiled
            assert b == pytest.approx(a, abs=1e-3)


def test_flash_attention_is_causal_from_the_bottom_right_with_grouped_heads():
    # The lean verdict pass calls flash attention directly for queries that are the last T of S keys:
    # against the masked fp32 reference, on bf16 inputs, 32 query heads over 8 KV heads.
    from airflow_hfllm.safety.verdict_pass import causal_attention

    torch.manual_seed(0)
    q = torch.randn(3, 32, 40, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(3, 8, 154, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    flash = causal_attention(q, k, v, 0.125, True).float()
    reference = causal_attention(q.float(), k.float(), v.float(), 0.125, True)
    torch.testing.assert_close(flash, reference, atol=2e-2, rtol=2e-2)
    top_left = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True,
                                                                scale=0.125, enable_gqa=True)
    assert (flash - top_left).abs().max() > 0.1  # the alignment matters: the test can tell them apart


def test_lean_verdict_pass_in_bf16_agrees_with_transformers(models):
    lean = guard(models, None, dtype="bfloat16")
    loaded = lean.load()
    assert lean._pass is not None and lean.compiled
    for kind, context in (("prompt", None), ("output", TEXTS[::-1])):
        a = [v.score for v in lean.check(TEXTS, kind, context)]
        lean_pass, lean._pass = lean._pass, None
        try:
            b = [v.score for v in lean.check(TEXTS, kind, context)]  # transformers' forward, eager
        finally:
            lean._pass = lean_pass
        assert loaded.model.dtype == torch.bfloat16
        assert a == pytest.approx(b, abs=0.05)  # bf16 rounding of a random tiny model; fp32 is exact above
