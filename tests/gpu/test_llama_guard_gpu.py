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


def test_prefix_attention_in_flash_equals_one_masked_softmax_over_prefix_and_row():
    # The lean verdict pass attends over the shared prefix and each row's own keys in two flash calls merged by
    # their log-sum-exp: against one masked fp32 softmax over the concatenated keys (the queries being the last
    # T of P + T keys), on bf16 inputs, 32 query heads over 8 KV heads.
    from airflow_hfllm.safety.verdict_pass import prefix_attention

    torch.manual_seed(0)
    n, t, p = 3, 40, 114
    q = torch.randn(n, t, 32, 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2)  # the layer's layout
    k, v = (torch.randn(n, 8, t, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    pk, pv = (torch.randn(1, 8, p, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    got = prefix_attention(q, k, v, pk, pv, 0.125).float()
    keys = torch.cat([pk.expand(n, -1, -1, -1), k], 2).float()
    values = torch.cat([pv.expand(n, -1, -1, -1), v], 2).float()
    mask = torch.arange(p + t, device="cuda")[None] <= torch.arange(t, device="cuda")[:, None] + p
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), keys, values, attn_mask=mask, scale=0.125,
                                                            enable_gqa=True)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    top_left = torch.nn.functional.scaled_dot_product_attention(q.float(), keys, values, is_causal=True, scale=0.125,
                                                                enable_gqa=True)
    assert (got - top_left).abs().max() > 0.1  # the alignment matters: the test can tell them apart


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
