"""The classifier checker on a GPU, in bf16 (the loader's dtype there): DeBERTa-v3 through the SDPA attention,
compiled (the default on CUDA for a caller that says nothing of its size) and not, against transformers' own
attention. The scores of random weights move by ~1e-3 with bf16 rounding alone (fused or not)."""

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from airflow_hfllm.safety.classifier import ClassifierChecker  # noqa: E402
from tests.unit.test_safety_classifier import TEXTS, deberta  # noqa: E402


def test_compiled_and_sdpa_classifier_give_transformers_scores(tmp_path):
    from airflow_hfllm.testing.text import tokenizer

    deberta().save_pretrained(tmp_path, safe_serialization=True)
    tokenizer("classifier-safety").save_pretrained(tmp_path)
    path = str(tmp_path)
    plain = ClassifierChecker(path, fast=False, compile=False, batch_size=3, token_budget=300)
    sdpa = ClassifierChecker(path, compile=False, batch_size=3, token_budget=300)
    compiled = ClassifierChecker(path, batch_size=3, token_budget=300)
    for texts in (TEXTS, [t[:50] for t in TEXTS[::-1]]):  # two sets of widths
        want = [v.score for v in plain.check(texts, "prompt")]
        for checker in (sdpa, compiled):
            assert [v.score for v in checker.check(texts, "prompt")] == pytest.approx(want, abs=0.02)
    assert plain.load().device.type == "cuda" and sdpa.lean and compiled.lean and compiled.compiled
    assert len(set(want)) == len(want)


@pytest.mark.parametrize("width,buckets,longest,kinds", [
    (37, 256, 512, ("c2p", "p2c")),  # deberta-v3: exact distances, a width off the 8s
    (300, 256, 512, ("c2p", "p2c")),  # past 128: log buckets
    (20, -1, 24, ("p2c",)),  # no buckets, distances past the span clamp
    (70, 32, 64, ("c2p",)),
])
def test_the_bias_kernel_equals_the_gathered_bias(width, buckets, longest, kinds):
    # The Triton kernel reads c2p/p2c by distance through a table; transformers gathers them by an index
    # [rows, heads, L, L]: equal in fp32, padded keys at the dtype's lowest value.
    from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position

    from airflow_hfllm.safety.deberta_kernel import bias

    torch.backends.cuda.matmul.allow_tf32 = False  # both sides' products in full fp32
    torch.manual_seed(0)
    b, h, hd, span = 3, 4, 32, buckets if buckets > 0 else longest
    q = torch.randn(b, width, h, hd, device="cuda").transpose(1, 2)  # the layer's layout
    k = torch.randn(b, width, h, hd, device="cuda").transpose(1, 2)
    pos_k = torch.randn(2 * span, h, hd, device="cuda") if "c2p" in kinds else None
    pos_q = torch.randn(2 * span, h, hd, device="cuda") if "p2c" in kinds else None
    keep = torch.rand(b, width, device="cuda") > 0.2
    rel = build_relative_position(q, k, bucket_size=buckets, max_position=longest).reshape(width, width).cuda()
    index = (rel + span).clamp(0, 2 * span - 1)
    table = torch.cat([index[0].flip(0), index[1:, 0]]).to(torch.int32)
    got = bias(q, k, pos_k, pos_q, table, keep, buckets, longest)
    assert got.shape == (b, h, width, -(-width // 8) * 8)
    want = torch.zeros(b, h, width, width, device="cuda")
    index = index.expand(b, h, width, width)
    if pos_k is not None:
        want += torch.gather(torch.einsum("bhid,phd->bhip", q, pos_k), -1, index)
    if pos_q is not None:
        want += torch.gather(torch.einsum("phd,bhjd->bhpj", pos_q, k), -2, index)
    want = want.masked_fill(~keep[:, None, None, :], torch.finfo(torch.float32).min)
    torch.testing.assert_close(got[..., :width], want, atol=1e-4, rtol=1e-4)
