"""The classifier checker: rows sorted by length in token-budget passes, verdicts in input order; the
DeBERTa-v2/v3 attention through SDPA equal to transformers' own."""

import pytest
import torch

from airflow_hfllm.safety.classifier import ClassifierChecker
from airflow_hfllm.safety.deberta import lean_attention, unsupported_reason

TEXTS = ["the committee reads the report. " * 9, "x", "river bridge " * 400, "hello there", "",
         "why? " * 30, "a quiet river near the old bridge"]


def test_rows_run_sorted_by_length_within_the_budget_and_verdicts_come_in_input_order(models):
    path = models("classifier-safety")  # random weights: every text its own score
    alone = [v.score for v in ClassifierChecker(path, batch_size=1).check(TEXTS, "prompt")]
    assert len(set(alone)) == len(alone)
    checker = ClassifierChecker(path, batch_size=3, token_budget=200)
    shapes = []
    hook = checker.load().model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        verdicts = checker.check(TEXTS, "prompt")
    finally:
        hook.remove()
    assert [v.score for v in verdicts] == pytest.approx(alone, abs=1e-5)
    widths = [width for _, width in shapes]
    assert widths == sorted(widths) and len(shapes) < checker.stats["rows"]
    assert all(rows <= 3 and (rows == 1 or rows * width <= 200) for rows, width in shapes)
    assert checker.stats["texts"] == len(TEXTS) and checker.stats["rows"] > len(TEXTS)  # the long text: windows
    assert checker.check([], "prompt") == []


def deberta(**config):
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(0)
    relative = dict(relative_attention=True, position_buckets=16, norm_rel_ebd="layer_norm", share_att_key=True,
                    pos_att_type=["p2c", "c2p"], position_biased_input=False)
    cfg = DebertaV2Config(vocab_size=2000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=128, max_position_embeddings=128, type_vocab_size=0,
                          id2label={0: "benign", 1: "malicious"}, label2id={"benign": 0, "malicious": 1},
                          **{**relative, **config})
    model = DebertaV2ForSequenceClassification(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(std=0.3)  # position terms that matter, so a wrong gather shows
    return model


@pytest.mark.parametrize("config", [{}, dict(share_att_key=False, pos_att_type=["c2p"], position_buckets=-1),
                                    dict(pos_att_type=["p2c"]),
                                    dict(relative_attention=False, position_biased_input=True)])
def test_sdpa_deberta_attention_equals_transformers_on_real_tokens(config):
    model = deberta(**config)
    assert unsupported_reason(model) is None
    ids = torch.randint(1, 2000, (3, 40))
    mask = torch.ones_like(ids)
    mask[1, 25:], mask[2, 7:] = 0, 0
    with torch.inference_mode():
        want = model.deberta(input_ids=ids * mask, attention_mask=mask).last_hidden_state
        with lean_attention(model):
            got = model.deberta(input_ids=ids * mask, attention_mask=mask).last_hidden_state
        again = model.deberta(input_ids=ids * mask, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert (got - want)[real].abs().max() < 1e-4 * want.abs().max()
    assert torch.equal(again, want)  # the block put transformers' attention back


def test_the_classifier_takes_the_sdpa_attention_for_deberta_only(models, tmp_path):
    from airflow_hfllm.testing.text import tokenizer

    deberta().save_pretrained(tmp_path, safe_serialization=True)
    tokenizer("classifier-safety").save_pretrained(tmp_path)
    fast, plain = ClassifierChecker(str(tmp_path)), ClassifierChecker(str(tmp_path), fast=False)
    texts = [t[:300] for t in TEXTS]
    scores = [v.score for v in fast.check(texts, "output", context=texts)]
    plain.load()
    assert fast.lean and not plain.lean
    assert scores == pytest.approx([v.score for v in plain.check(texts, "output")], abs=1e-5)
    assert len(set(scores)) == len(scores)
    bert = ClassifierChecker(models("classifier-safety"))
    assert "DeBERTa" in unsupported_reason(bert.load().model) and not bert.lean


def test_a_failing_sdpa_attention_falls_back_to_transformers(tmp_path, monkeypatch, caplog):
    from airflow_hfllm.safety import deberta as lean
    from airflow_hfllm.testing.text import tokenizer

    deberta().save_pretrained(tmp_path, safe_serialization=True)
    tokenizer("classifier-safety").save_pretrained(tmp_path)
    want = [v.score for v in ClassifierChecker(str(tmp_path), fast=False).check(TEXTS[:2], "prompt")]

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(lean, "_forward", broken)
    checker = ClassifierChecker(str(tmp_path))
    assert [v.score for v in checker.check(TEXTS[:2], "prompt")] == pytest.approx(want, abs=1e-6)
    assert not checker.lean and "no kernel" in caplog.text


def test_a_failing_triton_bias_falls_back_to_the_gathered_bias(tmp_path, monkeypatch, caplog):
    # On a GPU the bias is a Triton kernel (safety/deberta_kernel.py, GPU-tested); where it fails (a GPU or
    # Triton it does not suit), the checker keeps SDPA with the bias gathered, before giving up on SDPA.
    from airflow_hfllm.safety import deberta as lean
    from airflow_hfllm.testing.text import tokenizer

    deberta().save_pretrained(tmp_path, safe_serialization=True)
    tokenizer("classifier-safety").save_pretrained(tmp_path)
    want = [v.score for v in ClassifierChecker(str(tmp_path)).check(TEXTS[:2], "prompt")]  # gathered (CPU)
    calls = []

    def broken(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("no triton here")

    monkeypatch.setattr(lean, "triton_attention", lambda device: broken)
    checker = ClassifierChecker(str(tmp_path))
    assert checker.load() and checker.triton
    assert [v.score for v in checker.check(TEXTS[:2], "prompt")] == pytest.approx(want, abs=1e-6)
    assert calls and checker.lean and not checker.triton and "no triton here" in caplog.text
    calls.clear()
    checker.check(TEXTS[:1], "prompt")
    assert not calls  # once failed, not tried again


def test_the_compiled_classifier_gives_the_eager_scores_without_compiling_per_width(tmp_path, quick_inductor):
    from torch._dynamo.utils import counters

    from airflow_hfllm.testing.text import tokenizer

    deberta().save_pretrained(tmp_path, safe_serialization=True)
    tokenizer("classifier-safety").save_pretrained(tmp_path)
    texts = [t[:300] for t in TEXTS]
    eager = ClassifierChecker(str(tmp_path), batch_size=3, token_budget=200)
    compiled = ClassifierChecker(str(tmp_path), batch_size=3, token_budget=200, compile=True)
    want = [v.score for v in eager.check(texts, "prompt")]
    assert [v.score for v in compiled.check(texts, "prompt")] == pytest.approx(want, abs=1e-5)
    assert compiled.compiled and compiled.lean and not eager.compiled and compiled.compiler.seconds > 0
    frames = counters["frames"]["total"]
    others = ["a b c d e f g h " * n for n in (2, 5, 11)]  # other widths and row counts
    want = [v.score for v in eager.check(others, "output")]
    assert [v.score for v in compiled.check(others, "output")] == pytest.approx(want, abs=1e-5)
    assert counters["frames"]["total"] == frames and compiled.compiled  # nothing compiled again


@pytest.mark.parametrize("buckets, longest", [(256, 512), (16, 128), (-1, 512)])
def test_relative_positions_without_a_device_copy_equal_transformers(buckets, longest):
    from types import SimpleNamespace

    from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position

    from airflow_hfllm.safety.deberta import _relative_positions

    encoder = SimpleNamespace(relative_attention=True, position_buckets=buckets, max_relative_positions=longest)
    for width in (1, 7, 130, 302, 513):
        hidden = torch.zeros(2, width, 8)
        want = build_relative_position(hidden, hidden, bucket_size=buckets, max_position=longest)
        assert torch.equal(_relative_positions(encoder, hidden), want)


def test_padded_rows_right_and_left():
    from airflow_hfllm.engine.arch.layer import padded, padded_with_mask

    rows = [[5, 6, 7], [], [8], (9, 10)]
    assert padded(rows, 0).tolist() == [[5, 6, 7], [0, 0, 0], [8, 0, 0], [9, 10, 0]]
    assert padded(rows, 1, left=True).tolist() == [[5, 6, 7], [1, 1, 1], [1, 1, 8], [1, 9, 10]]
    assert padded([[]], 3).tolist() == [[3]] and padded(rows).dtype == torch.long
    _, mask = padded_with_mask(rows, 1, left=True)
    assert mask.tolist() == [[True] * 3, [False] * 3, [False, False, True], [False, True, True]]

