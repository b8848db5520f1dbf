"""TextJob end to end on a tiny model: output contract, per-row errors, resume, rebuild, seeds."""

import json
import os
import subprocess
import sys
import threading

import pandas as pd
import pyarrow.parquet as pq
import pytest

from airflow_hfllm.engine.generate import Cancelled
from airflow_hfllm.config import GenerationParams, ModelSpec
from airflow_hfllm.io.dataset import InputError
from airflow_hfllm.run.job import ErrorRateExceeded, TextJob
from tests.conftest import write_prompts

GREEDY = GenerationParams(max_new_tokens=12, do_sample=False)


def job(tiny_lm, tmp_path, **kw):
    kw.setdefault("params", GREEDY)
    kw.setdefault("chunk_rows", 10)
    kw.setdefault("output", str(tmp_path / "out"))
    return TextJob(input=str(tmp_path / "in"), model=ModelSpec(tiny_lm), **kw)


def read(tmp_path) -> pd.DataFrame:
    return pd.read_parquet(tmp_path / "out").sort_values("id").reset_index(drop=True)


def test_output_contract_and_manifest(tiny_lm, tmp_path):
    write_prompts(tmp_path / "in" / "a.parquet", 25, topic=[f"t{i}" for i in range(25)])
    manifest = job(tiny_lm, tmp_path, keep_columns=["topic"]).run()
    out = read(tmp_path)
    assert out.id.tolist() == list(range(25))
    assert set(out.finish_reason) <= {"stop", "length"}
    assert out.output.notna().all() and out.error.isna().all()
    assert (out.prompt_tokens > 0).all() and (out.output_tokens > 0).all()
    assert out.prompt_safe.isna().all() and out.output_safe.isna().all()  # no checker ran
    assert out.topic.tolist() == [f"t{i}" for i in range(25)]
    schema = pq.read_schema(tmp_path / "out" / "part-00000.parquet")
    assert [f.name for f in schema][:10] == ["id", "output", "finish_reason", "prompt_safe", "output_safe",
                                             "prompt_safety", "output_safety", "error", "prompt_tokens",
                                             "output_tokens"]
    meta = json.loads(schema.metadata[b"hfllm"])
    assert meta["model"]["model"] == tiny_lm and meta["fingerprint"] == manifest["fingerprint"]

    assert manifest["parts"] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert manifest["counts"]["rows"] == 25 and manifest["counts"]["generated"] == 25
    assert manifest["tokens"]["output"] == int(out.output_tokens.sum()) > 0
    assert manifest["output_tokens_per_second"] > 0 and manifest["seconds"] > 0
    assert json.loads((tmp_path / "out" / "_manifest.json").read_text()) == manifest
    assert sorted(os.listdir(tmp_path / "out")) == ["_attempts", "_commits", "_job.json", "_manifest.json",
                                                     "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]


def test_bad_rows_get_errors_and_others_still_run(tiny_lm, tmp_path):
    df = write_prompts(tmp_path / "in" / "a.parquet", 12)
    df.loc[3, "prompt"] = None
    df.loc[5, "prompt"] = "   "
    df.loc[7, "prompt"] = "word " * 3000  # longer than the tiny model's 2048-token context
    df.to_parquet(tmp_path / "in" / "a.parquet", index=False)
    manifest = job(tiny_lm, tmp_path, max_error_rate=0.5).run()
    out = read(tmp_path)
    assert out.loc[3, "error"] == "prompt is null"
    assert out.loc[5, "error"] == "prompt is empty"
    assert "tokens, over the limit of 2047 (the model's context of 2048 less one new token)" in out.loc[7, "error"]
    assert out.loc[[3, 5, 7], "finish_reason"].tolist() == ["error"] * 3
    assert out.loc[[3, 5, 7], "output"].isna().all()
    good = out.drop(index=[3, 5, 7])
    assert good.output.notna().all() and good.error.isna().all()
    assert manifest["counts"]["errors"] == 3 and manifest["counts"]["generated"] == 9


def test_error_rate_fails_after_writing_everything(tiny_lm, tmp_path):
    df = write_prompts(tmp_path / "in" / "a.parquet", 10)
    df["prompt"] = None
    df.loc[0, "prompt"] = "hello"
    df.to_parquet(tmp_path / "in" / "a.parquet", index=False)
    with pytest.raises(ErrorRateExceeded, match="9 of 10 rows ended in error"):
        job(tiny_lm, tmp_path).run()
    assert len(read(tmp_path)) == 10
    assert (tmp_path / "out" / "_manifest.json").exists()


def test_up_front_errors(tiny_lm, tmp_path):
    with pytest.raises(InputError, match="input not found"):
        job(tiny_lm, tmp_path).run()
    pd.DataFrame({"id": [1], "text": ["x"]}).to_parquet(tmp_path / "in.parquet")
    with pytest.raises(InputError, match="missing column 'prompt'"):
        TextJob(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"), model=ModelSpec(tiny_lm)).run()
    assert not (tmp_path / "out").exists()


def test_resume_skips_committed_parts_and_rebuild_on_change(tiny_lm, tmp_path):
    write_prompts(tmp_path / "in" / "a.parquet", 30)
    first = job(tiny_lm, tmp_path).run()
    parts = sorted((tmp_path / "out").glob("part-*.parquet"))
    stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in parts}
    before = read(tmp_path)

    # Same job again: nothing regenerated, same rows, a second attempt recorded.
    again = job(tiny_lm, tmp_path).run()
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in parts} == stamps
    assert again["fingerprint"] == first["fingerprint"] and again["counts"] == first["counts"]
    assert again["generate_seconds"] == 0 and len(again["attempts"]) == 2
    pd.testing.assert_frame_equal(read(tmp_path), before)

    # A lost part is redone alone.
    (tmp_path / "out" / "part-00001.parquet").unlink()
    job(tiny_lm, tmp_path).run()
    assert (tmp_path / "out" / "part-00000.parquet").stat().st_mtime_ns == stamps["part-00000.parquet"][1]
    pd.testing.assert_frame_equal(read(tmp_path), before)

    # Other parameters: another fingerprint, the folder is rebuilt (fewer chunks: stale parts go).
    rebuilt = job(tiny_lm, tmp_path, chunk_rows=20, params=GREEDY.replace(max_new_tokens=5)).run()
    assert rebuilt["fingerprint"] != first["fingerprint"]
    assert sorted(p.name for p in (tmp_path / "out").glob("part-*")) == ["part-00000.parquet", "part-00001.parquet"]
    assert len(rebuilt["attempts"]) == 1
    out = read(tmp_path)
    assert out.id.tolist() == list(range(30)) and (out.output_tokens <= 5).all()


def test_sampling_is_reproducible_and_seed_zero_works(tiny_lm, tmp_path):
    write_prompts(tmp_path / "in" / "a.parquet", 12)
    sample = GenerationParams(max_new_tokens=12, do_sample=True, temperature=1.0, seed=0)
    a = job(tiny_lm, tmp_path, params=sample, output=str(tmp_path / "a")).run()
    job(tiny_lm, tmp_path, params=sample, output=str(tmp_path / "b")).run()
    assert a["seed"] == 0 and a["generation"]["seed"] == 0
    ra, rb = pd.read_parquet(tmp_path / "a"), pd.read_parquet(tmp_path / "b")
    assert ra.output.tolist() == rb.output.tolist()
    greedy = job(tiny_lm, tmp_path, output=str(tmp_path / "g")).run()
    assert greedy["counts"]["rows"] == 12
    assert ra.output.tolist() != pd.read_parquet(tmp_path / "g").output.tolist()

    # seed=None: drawn once, kept in the output folder and reused by a retry.
    unseeded = sample.replace(seed=None)
    first = job(tiny_lm, tmp_path, params=unseeded, output=str(tmp_path / "u")).run()
    (tmp_path / "u" / "part-00000.parquet").unlink()
    retry = job(tiny_lm, tmp_path, params=unseeded, output=str(tmp_path / "u")).run()
    assert isinstance(first["seed"], int) and retry["seed"] == first["seed"]


def test_prompt_template_messages_and_system_prompt(tiny_lm, tmp_path):
    df = pd.DataFrame({"id": ["a", "b", "c"], "text": ["rivers and bridges", "winter coffee", None]})
    (tmp_path / "in").mkdir()
    df.to_parquet(tmp_path / "in" / "t.parquet", index=False)
    job(tiny_lm, tmp_path, prompt_column=None, prompt_template="Summarise: {{ row.text | upper }}",
        system_prompt="Be brief.", max_error_rate=1).run()
    out = read(tmp_path)
    assert out.error.isna().tolist() == [True, True, True]  # None renders as "NONE": a prompt after all
    assert out.prompt_tokens.iloc[0] > 5

    chat = pd.DataFrame({"id": [1, 2], "messages": [
        [{"role": "system", "content": "own system"}, {"role": "user", "content": "hello there"}],
        [],
    ]})
    chat.to_parquet(tmp_path / "chat.parquet", index=False)
    TextJob(input=str(tmp_path / "chat.parquet"), output=str(tmp_path / "chat-out"), model=ModelSpec(tiny_lm),
            params=GREEDY, messages_column="messages", prompt_column=None, max_error_rate=1).run()
    out = pd.read_parquet(tmp_path / "chat-out").sort_values("id")
    assert out.error.isna().tolist() == [True, False]
    assert out.error.iloc[1] == "messages is null or empty"
    assert out.output.iloc[0]


def test_template_error_is_a_row_error(tiny_lm, tmp_path):
    (tmp_path / "in").mkdir()
    pd.DataFrame({"id": [1, 2], "text": ["x", None]}).to_parquet(tmp_path / "in" / "t.parquet", index=False)
    # Fine for the first row, fails on the second (None + str): a row error, not the job's.
    job(tiny_lm, tmp_path, prompt_column=None, prompt_template="{{ row.text + '!' }}", max_error_rate=1).run()
    out = read(tmp_path)
    assert pd.isna(out.error[0]) and out.error[1].startswith("prompt_template failed:")


def test_per_row_max_new_tokens_column(tiny_lm, tmp_path):
    write_prompts(tmp_path / "in" / "a.parquet", 6, max_new_tokens=[1, 2, 3, None, 2, 1])
    job(tiny_lm, tmp_path).run()
    out = read(tmp_path)
    limits = [1, 2, 3, 12, 2, 1]
    assert all(t <= lim for t, lim in zip(out.output_tokens, limits))


def test_cancel_stops_between_batches(tiny_lm, tmp_path):
    write_prompts(tmp_path / "in" / "a.parquet", 40)
    j = job(tiny_lm, tmp_path, batch_size=2)
    seen = threading.Event()
    import airflow_hfllm.run.job as jobs_module

    class StopAfterFirstBatch(jobs_module.Progress):
        def batch(self, rows, tokens):
            super().batch(rows, tokens)
            seen.set()
            j.cancel()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jobs_module, "Progress", StopAfterFirstBatch)
        with pytest.raises(Cancelled):
            j.run()
    assert seen.is_set()
    assert not list((tmp_path / "out").glob("part-*.parquet"))


def test_text_jobs_do_not_import_the_vision_package(tiny_lm, tmp_path):
    """``import airflow_hfllm.run.job`` and a whole TextJob load no vision code (VisionJob lives in
    ``airflow_hfllm.vision.job``)."""
    write_prompts(tmp_path / "in" / "p.parquet", 3)
    code = (
        "import sys\n"
        "import airflow_hfllm.run.job as jobs\n"
        "loaded = lambda: sorted(m for m in sys.modules if m.startswith('airflow_hfllm.vision.'))\n"
        "print(loaded())\n"
        "from airflow_hfllm.config import GenerationParams, ModelSpec\n"
        f"jobs.TextJob(input={str(tmp_path / 'in')!r}, output={str(tmp_path / 'out')!r}, model=ModelSpec({tiny_lm!r}),\n"
        "             params=GenerationParams(max_new_tokens=4, do_sample=False)).run()\n"
        "print(loaded())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    after_import, after_run = done.stdout.strip().splitlines()[-2:]
    assert after_import == after_run == "[]"


def test_progress_counts_rows_that_never_reach_the_generator(tiny_lm, tmp_path, caplog):
    df = write_prompts(tmp_path / "in" / "a.parquet", 6)
    df.loc[[1, 4], "prompt"] = None  # two rows end in error before generation
    df.to_parquet(tmp_path / "in" / "a.parquet", index=False)
    with caplog.at_level("INFO", logger="airflow_hfllm"):
        job(tiny_lm, tmp_path, max_error_rate=1, progress_every=0).run()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
    assert lines and lines[-1].startswith("progress: 6/6 rows (100%)") and "errors 2" in lines[-1], lines
