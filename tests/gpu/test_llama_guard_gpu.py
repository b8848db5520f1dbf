"""The Llama Guard checker compiled (torch.compile, dynamic shapes; the default on CUDA) vs eager."""

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
            assert compiled._compiled is not None  # it compiled, and stayed compiled
            assert b == pytest.approx(a, abs=1e-3)
