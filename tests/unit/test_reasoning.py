"""Reasoning models: chat_template_kwargs reach the chat template, and with reasoning=True the <think>
block goes to its own column, out of the output and of the output check's answer, checked as its own
text. A tiny model that always answers "<think> a b </think> c d", through real jobs and the CLI."""

import json
import subprocess
import sys

import pandas as pd
import pyarrow.parquet as pq
import pytest

from airflow_hfllm.config import GenerationParams, ModelSpec
from airflow_hfllm.run.job import TextJob
from airflow_hfllm.run.rows import split_reasoning
from airflow_hfllm.safety.blocklist import BlocklistChecker
from airflow_hfllm.testing.families import make_thinking_model
from tests.conftest import write_prompts

GREEDY = GenerationParams(max_new_tokens=16, do_sample=False)


@pytest.fixture(scope="module")
def thinking(tmp_path_factory):
    path, reasoning, answer = make_thinking_model(tmp_path_factory.mktemp("thinking") / "model")
    return str(path), reasoning, answer


def test_split_reasoning():
    assert split_reasoning("<think>\nwhy\n</think>\n\nanswer") == ("why", "answer")
    assert split_reasoning("why</think>answer") == ("why", "answer")  # the template opened the block
    assert split_reasoning("<think> cut before the end") == ("cut before the end", "")
    assert split_reasoning("no block") == (None, "no block")
    assert split_reasoning("<think></think>answer") == ("", "answer")


def run(thinking, tmp_path, out="out", **kw):
    return TextJob(input=str(tmp_path / "in"), output=str(tmp_path / out), model=ModelSpec(thinking[0]),
                   params=GREEDY, chunk_rows=4, **kw).run()


def test_reasoning_column_and_its_own_check(thinking, tmp_path):
    _, reasoning, answer = thinking
    write_prompts(tmp_path / "in" / "a.parquet", 6)
    plain = run(thinking, tmp_path, "plain")
    rows = pd.read_parquet(tmp_path / "plain")
    assert "reasoning" not in rows.columns  # off: the folder's schema as before
    assert set(rows.output) == {f"<think> {reasoning}</think> {answer}"}

    split = run(thinking, tmp_path, "split", reasoning=True)
    assert split["fingerprint"] != plain["fingerprint"]
    rows = pd.read_parquet(tmp_path / "split")
    assert set(rows.output) == {answer} and set(rows.reasoning) == {reasoning}
    assert pq.read_schema(next((tmp_path / "split").glob("part-*.parquet"))).names[:3] == ["id", "output", "reasoning"]

    # A word only the reasoning holds: caught by the reasoning's own check, answer and reasoning redacted.
    word = reasoning.split()[0]
    run(thinking, tmp_path, "checked", reasoning=True, safety_checkers=[BlocklistChecker([word])])
    rows = pd.read_parquet(tmp_path / "checked")
    assert (rows.finish_reason == "unsafe_output").all() and rows.output.isna().all() and rows.reasoning.isna().all()
    verdicts = rows.output_safety[0]
    assert [(v["checker"], v["safe"]) for v in verdicts] == [("blocklist", True), ("blocklist (reasoning)", False)]
    # Without the split, the same word is in the answer the check reads.
    run(thinking, tmp_path, "unsplit", safety_checkers=[BlocklistChecker([word])])
    assert [v["checker"] for v in pd.read_parquet(tmp_path / "unsplit").output_safety[0]] == ["blocklist"]


def test_chat_template_kwargs_reach_the_template(thinking, tmp_path):
    write_prompts(tmp_path / "in" / "a.parquet", 3)
    default = run(thinking, tmp_path, "default")
    off = run(thinking, tmp_path, "off", chat_template_kwargs={"enable_thinking": False})
    assert off["fingerprint"] != default["fingerprint"]
    extra = pd.read_parquet(tmp_path / "off").prompt_tokens - pd.read_parquet(tmp_path / "default").prompt_tokens
    assert (extra > 0).all()  # the empty <think></think> block the template adds

    cli = [sys.executable, "-m", "airflow_hfllm.cli", "text", "--model", thinking[0], "--input", str(tmp_path / "in"),
           "--output", str(tmp_path / "cli"), "--max-new-tokens", "16", "--no-sample", "--reasoning",
           "--chat-template-kwargs", '{"enable_thinking": false}']
    done = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["counts"]["rows"] == 3
    assert set(pd.read_parquet(tmp_path / "cli").reasoning) == {thinking[1]}
    bad = subprocess.run([*cli[:-1], "{not json"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "chat_template_kwargs is not JSON" in bad.stderr
