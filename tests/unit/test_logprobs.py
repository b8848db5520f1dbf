"""logprobs=K: each output token's raw log-probability (log-softmax of the model's logits, before penalties,
temperature, top-k and top-p) and the K likeliest tokens at its step, the same from both engines and equal
to a teacher-forced forward pass; the columns only in folders written with them, one schema through a
resume."""

import sys

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from airflow_hfllm.config import GenerationParams, ModelSpec
from airflow_hfllm.engine.fast import FastEngine
from airflow_hfllm.engine.generate import BatchedGenerator
from airflow_hfllm.io.schema import LOGPROBS
from airflow_hfllm.run.job import TextJob
from tests.conftest import chat_requests, kill_after_first_part, rerun_leaves, write_prompts

K = 5
GREEDY = GenerationParams(max_new_tokens=16, do_sample=False, logprobs=K)


@pytest.fixture(scope="module")
def reqs(loaded):
    return chat_requests(loaded.tokenizer, 10, 16)


def engines(loaded, params):
    return {"fast": FastEngine(loaded, params, slots=4),  # fewer slots than rows: rows join mid-run
            "batched": BatchedGenerator(loaded, params, max_batch_size=4)}


def teacher_forced(loaded, prompt: list[int], output: list[int]):
    """log_softmax of the model's logits at each output token's step, from one forward pass over prompt + output."""
    ids = torch.tensor([prompt + output])
    with torch.inference_mode():
        logits = loaded.model(ids).logits[0, len(prompt) - 1:-1].float()
    return logits.log_softmax(-1)


def check_against_forward(loaded, req, completion, k=K):
    tokens = completion.top_logprobs
    assert len(tokens) == completion.output_tokens > 0
    output = [t["id"] for t in tokens]
    truth = teacher_forced(loaded, req.input_ids, output)
    own = truth.gather(1, torch.tensor(output)[:, None])[:, 0]
    assert [t["logprob"] for t in tokens] == pytest.approx(own.tolist(), abs=1e-4)
    top = truth.topk(k, dim=-1)
    for t, values, ids in zip(tokens, top.values.tolist(), top.indices.tolist()):
        assert len(t["top"]) == k
        assert [a["logprob"] for a in t["top"]] == pytest.approx(values, abs=1e-4)
        assert [a["id"] for a in t["top"]] == ids
        assert t["token"] == loaded.tokenizer.decode([t["id"]])
    assert completion.logprob == pytest.approx(sum(t["logprob"] for t in tokens), abs=1e-9)


def test_greedy_engines_agree_with_a_forward_pass(loaded, reqs):
    results = {name: engine.generate(reqs, seed=1) for name, engine in engines(loaded, GREEDY).items()}
    for req, fast, batched in zip(reqs, results["fast"], results["batched"]):
        assert fast.text == batched.text
        check_against_forward(loaded, req, fast)
        check_against_forward(loaded, req, batched)
        assert [t["logprob"] for t in fast.top_logprobs] == pytest.approx(
            [t["logprob"] for t in batched.top_logprobs], abs=1e-4)
        for t in fast.top_logprobs:  # greedy: the likeliest token is the one chosen
            assert t["top"][0]["id"] == t["id"] and t["top"][0]["logprob"] == pytest.approx(t["logprob"])
    # an EOS that ends a row is not an output token: it is neither in the list nor in the sum
    assert any(c.finish_reason == "stop" for c in results["fast"])


@pytest.mark.parametrize("name", ["fast", "batched"])
def test_sampled_logprobs_are_the_raw_models(loaded, reqs, name):
    params = GenerationParams(max_new_tokens=16, temperature=0.7, top_k=10, top_p=0.9, repetition_penalty=1.3,
                              presence_penalty=0.5, logprobs=3)
    for req, completion in zip(reqs, engines(loaded, params)[name].generate(reqs, seed=3)):
        check_against_forward(loaded, req, completion, k=3)


def test_no_alternatives_with_zero_and_nothing_without(loaded, reqs):
    zero = engines(loaded, GREEDY.replace(logprobs=0))
    none = engines(loaded, GREEDY.replace(logprobs=None))
    for name in ("fast", "batched"):
        for req, completion in zip(reqs[:3], zero[name].generate(reqs[:3])):
            assert all(t["top"] == [] for t in completion.top_logprobs)
            check_against_forward(loaded, req, completion, k=0)
        assert all(c.logprob is None and c.top_logprobs is None for c in none[name].generate(reqs[:3]))
    with pytest.raises(ValueError, match="logprobs must be <= 20"):
        GenerationParams(logprobs=21)


def run_job(tiny_lm, tmp_path, out, engine, **params):
    params = GenerationParams(max_new_tokens=8, do_sample=False, **params)
    return TextJob(input=str(tmp_path / "in"), output=str(tmp_path / out), model=ModelSpec(tiny_lm), params=params,
                   chunk_rows=4, engine=engine, safety_checkers=[f"blocklist:{tmp_path / 'block.txt'}"]).run()


@pytest.mark.parametrize("engine", ["fast", "batched"])
def test_job_writes_the_columns_and_a_plain_folder_has_none(tiny_lm, tmp_path, engine):
    df = write_prompts(tmp_path / "in" / "a.parquet", 10)
    df.loc[3, "prompt"] += " zanzibarquux"  # one prompt blocked: a row not generated
    df.to_parquet(tmp_path / "in" / "a.parquet", index=False)
    (tmp_path / "block.txt").write_text("zanzibarquux\n")
    with_ = run_job(tiny_lm, tmp_path, "with", engine, logprobs=2)
    plain = run_job(tiny_lm, tmp_path, "plain", engine)
    assert with_["fingerprint"] != plain["fingerprint"] and with_["generation"]["logprobs"] == 2
    assert not set(pd.read_parquet(tmp_path / "plain").columns) & {f.name for f in LOGPROBS}
    schema = pq.read_schema(tmp_path / "with" / "part-00000.parquet")
    for f in LOGPROBS:
        assert schema.field(f.name).type == f.type

    rows = pd.read_parquet(tmp_path / "with").set_index("id")
    table = ds.dataset(tmp_path / "with", format="parquet").to_table()
    assert table.num_rows == 10 and table.schema.field("top_logprobs").type == LOGPROBS[1].type
    blocked = rows.loc[3]
    assert blocked.finish_reason == "unsafe_prompt" and pd.isna(blocked.output_logprob)
    assert blocked.top_logprobs is None
    for _, row in rows.drop(index=3).iterrows():
        tokens = list(row.top_logprobs)
        assert len(tokens) == row.output_tokens and all(len(t["top"]) == 2 for t in tokens)
        assert row.output_logprob == pytest.approx(sum(t["logprob"] for t in tokens)) and row.output_logprob < 0
        assert "".join(t["token"] for t in tokens).strip() == row.output.strip()
    # the outputs themselves are what a job without logprobs writes
    assert rows.output.to_dict() == pd.read_parquet(tmp_path / "plain").set_index("id").output.to_dict()


def test_kill_9_then_rerun_keeps_one_schema(tiny_lm, tmp_path):
    write_prompts(tmp_path / "in.parquet", 300)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "airflow_hfllm.cli", "text", "--model", tiny_lm, "--input", str(tmp_path / "in.parquet"),
           "--output", str(out), "--max-new-tokens", "8", "--chunk-rows", "10", "--seed", "7", "--logprobs", "3"]
    written = kill_after_first_part(cmd, out)
    assert written and len(written) < 30, "killed mid-run"
    rerun_leaves(cmd, out, written)
    schemas = {pq.read_schema(p).remove_metadata() for p in out.glob("part-*.parquet")}
    assert len(schemas) == 1 and pa.field("output_logprob", pa.float64()) in next(iter(schemas))
    rows = pd.read_parquet(out)
    assert sorted(rows.id) == list(range(300)) and rows.output_logprob.notna().all()


def test_a_redacted_output_takes_its_tokens_with_it(tiny_lm, tmp_path):
    write_prompts(tmp_path / "in" / "a.parquet", 10)
    (tmp_path / "block.txt").write_text("zanzibarquux\n")
    run_job(tiny_lm, tmp_path, "plain", "batched")
    word = max(pd.read_parquet(tmp_path / "plain").set_index("id").output[0].split(), key=len)
    (tmp_path / "block.txt").write_text(f"{word}\n")  # what row 0 writes: its output check fails
    run_job(tiny_lm, tmp_path, "redacted", "batched", logprobs=1)
    rows = pd.read_parquet(tmp_path / "redacted").set_index("id")
    unsafe = rows[rows.finish_reason == "unsafe_output"]
    assert 0 in unsafe.index and len(unsafe) < len(rows)
    assert unsafe.output.isna().all() and unsafe.output_logprob.isna().all() and unsafe.top_logprobs.isna().all()
    assert rows.drop(index=unsafe.index).top_logprobs.notna().all()
