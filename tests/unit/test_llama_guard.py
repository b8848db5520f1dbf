"""Llama Guard 3 style checker: tiny models whose answers are forced, run through TextJob; the shared
prefix KV cache against plain full forwards; windows; failures that must never pass as safe."""

import pandas as pd
import pytest
import torch

from airflow_hfllm.engine.loading import get_model
from airflow_hfllm.config import GenerationParams, ModelSpec
from airflow_hfllm.run.job import TextJob
from airflow_hfllm.safety import KINDS, SafetyChecker, Verdict, make_checker
from airflow_hfllm.safety.llama_guard import CATEGORIES, LlamaGuardChecker, parse_categories
from airflow_hfllm.testing.models import make_tiny_model
from tests.conftest import failing_compile, write_prompts

GREEDY = GenerationParams(max_new_tokens=10, do_sample=False)
FORCED_CATEGORIES = ["Violent Crimes", "Hate"]  # the forced tiny model answers "unsafe\nS1,S10"
TEXTS = ["hello", "a quiet river near the old bridge " * 3, "why?", "the committee reads the report. " * 9, "x y"]


def guard(models, verdict, **options) -> LlamaGuardChecker:
    return make_checker({"kind": "llama-guard", "model": models("llama-guard", verdict), **options})


def run(tiny_lm, tmp_path, checkers, n=8, edit=None, **kw):
    df = write_prompts(tmp_path / "in.parquet", n)
    if edit:
        edit(df)
        df.to_parquet(tmp_path / "in.parquet", index=False)
    manifest = TextJob(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"), model=ModelSpec(tiny_lm),
                       params=GREEDY, safety_checkers=checkers, **kw).run()
    return manifest, pd.read_parquet(tmp_path / "out").set_index("id").sort_index()


class OutputsOnly(SafetyChecker):
    """Runs a real checker on outputs only (prompts pass), so one forced model can flag outputs."""

    name = "outputs-only"

    def __init__(self, inner):
        self.inner = inner

    def load(self):
        self.inner.load()

    def check(self, texts, kind, context=None):
        if kind == "prompt":
            return [Verdict(self.name, True, 0.0) for _ in texts]
        return self.inner.check(texts, kind, context)


def test_unsafe_prompts_are_not_generated(tiny_lm, models, tmp_path):
    manifest, out = run(tiny_lm, tmp_path, [f"llama-guard:{models('llama-guard', 'unsafe')}"])
    assert (out.finish_reason == "unsafe_prompt").all()
    assert out.output.isna().all() and (out.output_tokens == 0).all() and out.output_safe.isna().all()
    assert (~out.prompt_safe.astype(bool)).all()
    for evidence in out.prompt_safety:
        (verdict,) = evidence
        assert verdict["checker"] == f"llama-guard:{models('llama-guard', 'unsafe')}"
        assert not verdict["safe"] and verdict["score"] > 0.99
        assert list(verdict["categories"]) == FORCED_CATEGORIES
    assert manifest["counts"]["unsafe_prompt"] == 8 and manifest["counts"]["generated"] == 0
    assert manifest["safety"][0]["checker"] == "llama-guard"


def test_safe_checker_passes_everything(tiny_lm, models, tmp_path):
    manifest, out = run(tiny_lm, tmp_path, [guard(models, "safe")])
    assert out.finish_reason.isin(["stop", "length"]).all() and out.output.notna().all()
    assert out.prompt_safe.all() and out.output_safe.all()
    for column in ("prompt_safety", "output_safety"):
        for (verdict,) in out[column]:
            assert verdict["safe"] and verdict["score"] < 0.01 and len(verdict["categories"]) == 0
    assert manifest["counts"]["generated"] == 8


def test_unsafe_outputs_are_redacted_with_categories(tiny_lm, models, tmp_path):
    checker = guard(models, "unsafe")
    manifest, out = run(tiny_lm, tmp_path, [OutputsOnly(checker)])
    assert (out.finish_reason == "unsafe_output").all() and out.output.isna().all()
    assert (out.output_tokens > 0).all() and out.prompt_safe.all() and (~out.output_safe.astype(bool)).all()
    for (verdict,) in out.output_safety:
        assert not verdict["safe"] and verdict["score"] > 0.99 and list(verdict["categories"]) == FORCED_CATEGORIES
    assert manifest["counts"]["unsafe_output"] == 8
    assert checker.stats["texts"] == 8  # the real checker judged the 8 outputs (and no prompt)


def test_prompt_checks_judge_the_user_turn_output_checks_the_agent_turn(models):
    checker = guard(models, "safe")
    prompt = checker.prompt_for("How do I bake bread?", "prompt")
    assert "unsafe content in 'User' messages" in prompt and "ONLY THE LAST User message" in prompt
    assert "<BEGIN CONVERSATION>\n\nUser: How do I bake bread?\n\n<END CONVERSATION>" in prompt
    output = checker.prompt_for("  Knead and bake.", "output", context="How do I bake bread?")
    assert "unsafe content in 'Agent' messages" in output and "ONLY THE LAST Agent message" in output
    assert "User: How do I bake bread?\n\nAgent: Knead and bake.\n\n<END CONVERSATION>" in output
    assert "S11: Self-Harm.\nS12: Sexual Content.\nS13: Elections.\nS14: Code Interpreter Abuse.\n" in output
    assert output.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")

    # The built-in Llama Guard 3 prompt is what the model's own chat template renders.
    builtin = guard(models, "safe", template="builtin")
    tok = get_model(checker.spec).tokenizer
    assert builtin.prompt_for("How do I bake bread?", "prompt") == prompt == tok.apply_chat_template(
        [{"role": "user", "content": "How do I bake bread?"}], tokenize=False)
    assert builtin.prompt_for("Knead and bake.", "output", "How do I bake bread?") == output
    assert checker._own_template and not builtin._own_template


def test_shared_prefix_kv_equals_a_plain_full_forward(models):
    checker = guard(models, None)  # random weights: logits depend on every token
    loaded = checker.load()
    model, tok = loaded.model, loaded.tokenizer
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    assert checker._pass is not None  # a Llama: verdicts take the lean pass
    try:
        for kind, context in (("prompt", None), ("output", TEXTS[::-1])):
            seen.clear()
            verdicts = checker.check(TEXTS, kind, context)
            prefix = checker._prefix_ids[kind]
            full = [tok(checker.prompt_for(t, kind, c), add_special_tokens=False)["input_ids"]
                    for t, c in zip(TEXTS, context or [None] * len(TEXTS))]
            assert all(ids[:len(prefix)] == prefix for ids in full) and len(prefix) > 100
            # check() forwarded each row's own tokens only: the prefix came from the cache
            assert seen and max(seen) == max(len(ids) - len(prefix) for ids in full)

            rows = [ids[len(prefix):] for ids in full]
            lean = checker._run(loaded, kind, rows)  # one batch padded on the right over the prefix cache
            lean_pass, checker._pass = checker._pass, None
            try:
                left = checker._run(loaded, kind, rows)  # transformers' forward, padded on the left
            finally:
                checker._pass = lean_pass
            with torch.inference_mode():
                plain = torch.stack([model(input_ids=torch.tensor([ids])).logits[0, -1] for ids in full]).float()
            assert plain.std(0).mean() > 0.5  # rows differ: the comparison is not vacuous
            torch.testing.assert_close(lean, plain, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(left, plain, atol=1e-4, rtol=1e-4)

            pair = plain[:, [checker._answer["safe"][0], checker._answer["unsafe"][0]]].softmax(-1)[:, 1]
            assert [v.score for v in verdicts] == pytest.approx(pair.tolist(), abs=1e-5)
            assert [v.safe for v in verdicts] == [p < 0.5 for p in pair.tolist()]
    finally:
        hook.remove()


def test_forced_tiny_model_answers_in_the_llama_guard_format(models):
    for verdict, answer in (("safe", "safe"), ("unsafe", "unsafe\nS1,S10")):
        checker = guard(models, verdict)
        loaded = checker.load()
        ids = loaded.tokenizer(checker.prompt_for("anything at all", "prompt"), add_special_tokens=False,
                               return_tensors="pt")
        out = loaded.model.generate(**ids, max_new_tokens=12, do_sample=False)
        assert loaded.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True) == answer
    assert parse_categories(answer) == tuple(FORCED_CATEGORIES)
    assert parse_categories("\nS2, S14,S2,S99") == ("Non-Violent Crimes", "Code Interpreter Abuse", "S99")
    assert len(CATEGORIES) == 14


def test_long_texts_are_windowed_unsafe_if_any_window_is(models):
    long_text = " ".join(f"the pilot {w} a letter" for w in ("sees", "likes", "builds", "reads") * 25)
    checker = guard(models, None, max_length=256)
    loaded = checker.load()
    tok = loaded.tokenizer
    for kind, context in (("prompt", ""), ("output", "Why does the farmer look so strange? " * 20)):
        parts = checker.windows(tok, long_text, kind, context)
        assert 3 <= len(parts) <= 20
        for window, ctx in parts:
            assert len(tok(checker.prompt_for(window, kind, ctx), add_special_tokens=False)["input_ids"]) <= 256
            if kind == "output":  # the prompt as context keeps its end, nearest to the answer
                assert context.strip().endswith(ctx.strip()) and 0 < len(ctx) < len(context)
        covered = " ".join(w for w, _ in parts).split()
        assert set(covered) == set(long_text.split()) and len(covered) >= len(long_text.split())  # nothing cut
        (whole,) = checker.check([long_text], kind, [context])
        scores = [v.score for v in checker.check([w for w, _ in parts], kind, [c for _, c in parts])]
        assert whole.score == pytest.approx(max(scores), abs=1e-5) and max(scores) > min(scores) + 1e-3
        # With a threshold between the windows' scores, one unsafe window makes the whole text unsafe.
        strict = guard(models, None, max_length=256, threshold=(min(scores) + max(scores)) / 2)
        assert not strict.check([long_text], kind, [context])[0].safe
        assert any(v.safe for v in strict.check([w for w, _ in parts], kind, [c for _, c in parts]))
    assert not guard(models, "unsafe", max_length=256).check([long_text], "prompt")[0].safe
    assert guard(models, "safe", max_length=256).check([long_text], "prompt")[0].safe


def test_a_failing_checker_never_yields_safe(tiny_lm, models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A model that yields NaN for any text holding <|im_start|> (fp16 overflow looks like this):
    # NaN compares false against the threshold and would pass as safe unless the checker raises.
    folder = make_tiny_model(tmp_path / "nan-guard", "llama-guard", verdict="safe")
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.embed_tokens.weight[AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids("<|im_start|>")] = \
            float("nan")
    model.save_pretrained(folder)
    checker = make_checker(f"llama-guard:{folder}")
    with pytest.raises(FloatingPointError, match="non-finite"):
        checker.check(["fine", "<|im_start|> poison"], "prompt")

    def poison_row(df):
        df.loc[2, "prompt"] = "<|im_start|> " + df.loc[2, "prompt"]

    manifest, out = run(tiny_lm, tmp_path / "job", [checker], edit=poison_row, max_error_rate=0.5)
    assert out.loc[2, "finish_reason"] == "error" and pd.isna(out.loc[2, "output"])
    assert out.loc[2, "error"].startswith(f"safety checker llama-guard:{folder} failed: FloatingPointError")
    assert pd.isna(out.loc[2, "prompt_safe"]) and len(out.loc[2, "prompt_safety"]) == 0
    others = out.drop(index=2)
    assert others.prompt_safe.all() and others.output_safe.all() and others.output.notna().all()
    assert manifest["counts"]["errors"] == 1


def test_make_checker_llama_guard(models):
    assert "llama-guard" in KINDS
    checker = make_checker(f"llama-guard:{models('llama-guard', 'safe')}")
    assert isinstance(checker, LlamaGuardChecker) and checker.spec.task == "causal-lm"
    assert checker.fingerprint()["checker"] == "llama-guard"
    assert make_checker({"kind": "llama-guard", "model": "x", "threshold": 0.3}).threshold == 0.3
    with pytest.raises(ValueError, match="KIND:MODEL"):
        make_checker("llama-guard:")
    with pytest.raises(ValueError, match="template must be"):
        make_checker({"kind": "llama-guard", "model": "x", "template": "mine"})


def test_a_decoder_that_fails_to_compile_runs_eager(models, monkeypatch, caplog):
    """compile=True where torch.compile fails (at its first call, as a real failure does): the lean verdict
    pass (pure) runs that call again eagerly, verdicts equal the eager checker's, later batches stay eager."""
    calls = []
    broken_compile = failing_compile(calls)
    eager = guard(models, None)
    expected = [v.score for v in eager.check(TEXTS, "output", TEXTS[::-1])]
    monkeypatch.setattr(torch, "compile", broken_compile)
    compiled = guard(models, None, compile=True)
    compiled._loaded = None  # load again, now with compile on
    got = compiled.check(TEXTS, "output", TEXTS[::-1])
    assert len(calls) == 1 and not compiled.compiled
    assert [v.score for v in got] == pytest.approx(expected, abs=1e-6)
    assert "torch.compile failed (RuntimeError: inductor: no C++ compiler); running eager" in caplog.text


def test_the_default_compiles_only_for_runs_large_enough_to_repay_it(tiny_lm, models, tmp_path):
    from airflow_hfllm.safety.base import COMPILE_MIN_TEXTS, compiles

    def should(checker, device):
        return compiles(checker.compile, checker._expected, device)

    checker = guard(models, "safe")
    assert not should(checker, "cpu")
    assert should(checker, "cuda")  # nothing said (a direct caller): compile on CUDA
    checker.expect(COMPILE_MIN_TEXTS - 1)
    assert not should(checker, "cuda")
    checker.expect(COMPILE_MIN_TEXTS)
    assert should(checker, "cuda")
    forced = guard(models, "safe", compile=True)
    forced.expect(10)
    assert should(forced, "cuda") and should(forced, "cpu")
    assert not should(guard(models, "safe", compile=False), "cuda")

    # the job says how many texts it will check: a prompt and an output per row still to do
    checker._expected = None
    run(tiny_lm, tmp_path, [checker], n=8)
    assert checker._expected == 16
    checker._expected = None
    TextJob(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"), model=ModelSpec(tiny_lm),
            params=GREEDY, safety_checkers=[checker]).run()  # everything committed: nothing to check
    assert checker._expected is None
