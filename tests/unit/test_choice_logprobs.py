"""choices with logprobs: each row gets every choice's total log-probability after its prompt (the model as
a classifier with a score), the same from both engines, equal to a teacher-forced forward of the model."""

import pandas as pd
import pytest

from airflow_hfllm.config import GenerationParams, ModelSpec
from airflow_hfllm.run.job import TextJob
from tests.conftest import write_prompts

CHOICES = ("positive", "negative", "neutral")


def run(tiny_lm, tmp_path, engine, **params):
    return TextJob(input=str(tmp_path / "in.parquet"), output=str(tmp_path / engine), model=ModelSpec(tiny_lm),
                   params=GenerationParams(max_new_tokens=8, do_sample=False, choices=CHOICES, **params),
                   chunk_rows=5, engine=engine).run()


def test_choice_logprobs_from_both_engines_equal_the_model(tiny_lm, tmp_path):
    import torch

    from airflow_hfllm.engine.loading import get_model
    from airflow_hfllm.engine.prompts import encode

    write_prompts(tmp_path / "in.parquet", 12)
    for engine in ("batched", "fast"):
        run(tiny_lm, tmp_path, engine, logprobs=1)
    batched, fast = (pd.read_parquet(tmp_path / e).sort_values("id").reset_index(drop=True) for e in ("batched", "fast"))
    assert list(batched.output) == list(fast.output) and set(batched.output) <= set(CHOICES)
    loaded = get_model(ModelSpec(tiny_lm))
    prompts = pd.read_parquet(tmp_path / "in.parquet").set_index("id").prompt
    for b, f in zip(batched.itertuples(), fast.itertuples()):
        assert [c["choice"] for c in b.choice_logprobs] == list(CHOICES)
        got = {c["choice"]: c["logprob"] for c in b.choice_logprobs}
        assert got == pytest.approx({c["choice"]: c["logprob"] for c in f.choice_logprobs}, abs=1e-4)
        prompt = encode(loaded.tokenizer, [{"role": "user", "content": prompts[b.id]}])
        for name in CHOICES:  # teacher-forced: the sum of each choice token's log-probability
            tokens = loaded.tokenizer.encode(name, add_special_tokens=False)
            with torch.no_grad():
                lp = loaded.model(torch.tensor([prompt + tokens])).logits[0].log_softmax(-1)
            want = sum(lp[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(tokens))
            assert got[name] == pytest.approx(want, abs=1e-4)
        # greedy under the grammar picks the first token the model likes best: a choice starting with it
        assert b.output_logprob <= 0 and all(v <= 0 for v in got.values())


def test_no_choice_logprobs_without_logprobs(tiny_lm, tmp_path):
    write_prompts(tmp_path / "in.parquet", 5)
    run(tiny_lm, tmp_path, "batched")
    assert "choice_logprobs" not in pd.read_parquet(tmp_path / "batched").columns
