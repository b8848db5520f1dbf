"""The Llama Guard checker compiled (torch.compile, dynamic shapes; the default on CUDA) vs eager."""

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from tests.unit.test_llama_guard import TEXTS, guard  # noqa: E402


def test_compiled_checker_gives_the_eager_scores(models):
    eager = guard(models, None, compile=False)
    compiled = guard(models, None)
    assert eager.load().device.type == "cuda"
    for kind, context in (("prompt", None), ("output", TEXTS[::-1])):
        for texts, ctx in ((TEXTS, context), (TEXTS[:3], context[:3] if context else None)):  # two shapes
            a = [v.score for v in eager.check(texts, kind, ctx)]
            b = [v.score for v in compiled.check(texts, kind, ctx)]
            assert compiled._compiled is not None  # it compiled, and stayed compiled
            assert b == pytest.approx(a, abs=2e-3)
