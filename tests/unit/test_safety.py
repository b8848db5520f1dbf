"""Safety: verdicts from real tiny checker models, pluggable checkers, failures never pass as safe."""

import pandas as pd
import pytest

from airflow_hfllm.config import GenerationParams, ModelSpec
from airflow_hfllm.run.job import TextJob
from airflow_hfllm.safety import SafetyChecker, Verdict, judge, make_checker
from airflow_hfllm.safety.base import windows
from airflow_hfllm.safety.blocklist import BlocklistChecker
from tests.conftest import write_prompts

GREEDY = GenerationParams(max_new_tokens=10, do_sample=False)


class OutputsUnsafe(SafetyChecker):
    """Passes prompts, flags every output: a user-written checker plugged in as an object."""

    name = "outputs-unsafe"

    def check(self, texts, kind, context=None):
        assert kind == "output" or context is None
        if kind == "output":
            assert context is not None and len(context) == len(texts)
        return [Verdict(self.name, kind == "prompt", 0.9 if kind == "output" else 0.1,
                        ("violence",) if kind == "output" else ()) for _ in texts]


class Flaky(SafetyChecker):
    """Raises on any batch holding a text with 'poison' in it."""

    name = "flaky"

    def check(self, texts, kind, context=None):
        if any("poison" in t for t in texts):
            raise RuntimeError("checker crashed")
        return [Verdict(self.name, True, 0.0) for _ in texts]


def run(tiny_lm, tmp_path, checkers, n=10, **kw):
    df = write_prompts(tmp_path / "in.parquet", n)
    if "edit" in kw:
        kw.pop("edit")(df)
        df.to_parquet(tmp_path / "in.parquet", index=False)
    manifest = TextJob(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"), model=ModelSpec(tiny_lm),
                       params=GREEDY, safety_checkers=checkers, **kw).run()
    return manifest, pd.read_parquet(tmp_path / "out").set_index("id").sort_index()


def test_unsafe_prompts_are_not_generated(tiny_lm, models, tmp_path):
    manifest, out = run(tiny_lm, tmp_path, [f"classifier:{models('classifier-safety', 'unsafe')}"])
    assert (out.finish_reason == "unsafe_prompt").all()
    assert out.output.isna().all() and (out.output_tokens == 0).all()
    assert (~out.prompt_safe.astype(bool)).all() and out.output_safe.isna().all()
    verdict = out.prompt_safety.iloc[0][0]
    assert verdict["checker"].startswith("classifier:") and not verdict["safe"] and verdict["score"] > 0.99
    assert list(verdict["categories"]) == ["unsafe"]
    assert manifest["counts"]["unsafe_prompt"] == 10 and manifest["counts"]["generated"] == 0


def test_unsafe_outputs_redacted_or_kept(tiny_lm, tmp_path):
    manifest, out = run(tiny_lm, tmp_path, [OutputsUnsafe()])
    assert (out.finish_reason == "unsafe_output").all() and out.output.isna().all()
    assert out.prompt_safe.all() and (~out.output_safe.astype(bool)).all()
    assert list(out.output_safety.iloc[0][0]["categories"]) == ["violence"]
    assert (out.output_tokens > 0).all() and manifest["counts"]["unsafe_output"] == 10

    _, kept = run(tiny_lm, tmp_path / "keep", [OutputsUnsafe()], on_unsafe_output="keep")
    assert (kept.finish_reason == "unsafe_output").all() and kept.output.notna().all()


def test_a_failing_checker_never_yields_safe(tiny_lm, tmp_path):
    def poison(df):
        df.loc[2, "prompt"] = "poison " + df.loc[2, "prompt"]
    manifest, out = run(tiny_lm, tmp_path, [Flaky()], edit=poison, max_error_rate=0.5)
    assert out.loc[2, "finish_reason"] == "error"
    assert out.loc[2, "error"] == "safety checker flaky failed: RuntimeError: checker crashed"
    assert pd.isna(out.loc[2, "prompt_safe"]) and len(out.loc[2, "prompt_safety"]) == 0
    assert pd.isna(out.loc[2, "output"])
    others = out.drop(index=2)
    assert others.prompt_safe.all() and others.output.notna().all()
    assert manifest["counts"]["errors"] == 1


def test_several_checkers_any_unsafe_wins():
    texts = ["a calm river", "buy cheap pills now"]
    judgements = judge([BlocklistChecker(["pills"]), Flaky()], texts, "prompt")
    assert [j.safe for j in judgements] == [True, False]
    assert [v.checker for v in judgements[1].verdicts] == ["blocklist", "flaky"]
    assert judgements[1].verdicts[0].categories == ("blocklist",)


def test_blocklist_file_and_word_boundaries(tmp_path):
    (tmp_path / "terms.txt").write_text("# comment\nbad word\nkill\n")
    checker = make_checker(f"blocklist:{tmp_path / 'terms.txt'}")
    verdicts = checker.check(["a BAD  WORD here", "bad word", "skill set", "kill it"], "prompt")
    assert [v.safe for v in verdicts] == [True, False, True, False]


def test_salesforce_checker_verdicts_and_long_texts(models):
    safe = make_checker(f"salesforce:{models('seq2seq-safety', 'safe')}")
    unsafe = make_checker(f"salesforce:{models('seq2seq-safety', 'unsafe')}")
    long_text = "river bridge " * 600  # ~1200+ tokens: checked in windows, never truncated
    texts = ["hello there", long_text, ""]
    assert [v.safe for v in safe.check(texts, "prompt")] == [True, True, True]
    verdicts = unsafe.check(texts, "output", context=["q"] * 3)
    assert [v.safe for v in verdicts] == [False, False, False]
    assert all(v.score > 0.99 for v in verdicts)
    assert all(set(v.categories) <= {"toxicity", "hate", "identity", "violence", "physical", "sexual",
                                     "profanity", "biased"} for v in verdicts)


def test_classifier_needs_recognisable_labels(models):
    checker = make_checker(f"classifier:{models('classifier-safety', 'safe')}")
    assert all(v.safe and v.score < 0.01 for v in checker.check(["x", "y " * 2000], "prompt"))
    strict = make_checker({"kind": "classifier", "model": models("classifier-safety", "safe"),
                           "safe_labels": ["nothing-matches"]})
    with pytest.raises(ValueError, match="cannot tell safe from unsafe labels"):
        strict.load()


def test_checker_spec_errors():
    with pytest.raises(ValueError, match="KIND:MODEL"):
        make_checker("salesforce")
    with pytest.raises(ValueError, match="unknown safety checker kind 'nope'"):
        make_checker("nope:x")


def test_windows_cover_everything():
    ids = list(range(1000))
    parts = windows(ids, 100, overlap=10)
    assert all(len(p) <= 100 for p in parts)
    assert set().union(*map(set, parts)) == set(ids)
    assert windows([1, 2], 100) == [[1, 2]]
    small = windows(ids[:100], 20)  # the overlap shrinks with the window: it must still advance
    assert len(small) <= 7 and set().union(*map(set, small)) == set(ids[:100])


@pytest.mark.parametrize("kind", ["salesforce", "llama-guard", "classifier"])
def test_a_checker_that_cannot_load_fails_the_job_before_any_work(tiny_lm, tmp_path, kind):
    missing = tmp_path / "no-such-model"
    with pytest.raises(OSError, match="no-such-model"):
        run(tiny_lm, tmp_path, [f"{kind}:{missing}"])
    assert not list((tmp_path / "out").glob("part-*")) and not (tmp_path / "out" / "_manifest.json").exists()
