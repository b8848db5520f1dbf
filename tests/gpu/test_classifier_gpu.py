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
