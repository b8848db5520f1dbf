"""Several writers of one output folder: a frozen attempt of an older job, two attempts starting
together, sharded re-runs over a changed input. The folder ends up holding one job's rows, and its
manifest says which."""

import json
import subprocess
import sys
import threading

import pandas as pd
import pyarrow.parquet as pq
import pytest

from airflow_hfllm.config import GenerationParams, ModelSpec
from airflow_hfllm.io.dataset import Dataset, to_fs
from airflow_hfllm.io.parts import OutputDir
from airflow_hfllm.run.manifest import merge_shards
from airflow_hfllm.run.shards import plan_shards
from airflow_hfllm.run.job import Superseded, TextJob
from airflow_hfllm.run.state import FolderState
from tests.conftest import write_prompts

GREEDY = GenerationParams(max_new_tokens=4, do_sample=False)


def text_job(tiny_lm, tmp_path, **kw):
    kw.setdefault("input", str(tmp_path / "in"))
    kw.setdefault("output", str(tmp_path / "out"))
    kw.setdefault("params", GREEDY)
    kw.setdefault("chunk_rows", 10)
    return TextJob(model=ModelSpec(tiny_lm), **kw)


def commit_fingerprints(out) -> set[str]:
    return {json.loads(p.read_text())["fingerprint"] for p in (out / "_commits").glob("part-*.json")}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("frozen", ["between parts", "inside a write"])
def test_a_frozen_attempt_of_an_older_job_never_overwrites_its_finished_successor(tiny_lm, tmp_path, monkeypatch,
                                                                                frozen):
    out = tmp_path / "out"
    write_prompts(tmp_path / "in" / "a.parquet", 100)
    paused, resume = threading.Event(), threading.Event()
    check_owner, write_part = FolderState.check_owner, OutputDir.write_part
    writes = []

    def freeze_old_attempt():
        if threading.current_thread().name == "old" and len(writes) == 3 and not paused.is_set():
            paused.set()
            assert resume.wait(120)

    def check_owner_frozen(self, *args):
        if frozen == "between parts":  # before the check of its fourth part
            freeze_old_attempt()
        return check_owner(self, *args)

    def write_part_frozen(self, *args):
        if frozen == "inside a write":  # after the check before the write: the race it can't close
            freeze_old_attempt()
        record = write_part(self, *args)
        if threading.current_thread().name == "old":
            writes.append(record)
        return record

    monkeypatch.setattr(FolderState, "check_owner", check_owner_frozen)
    monkeypatch.setattr(OutputDir, "write_part", write_part_frozen)
    old_error = []

    def run_old():
        try:
            text_job(tiny_lm, tmp_path).run()
        except BaseException as exc:  # noqa: B036 - what the old attempt ended with is the point
            old_error.append(exc)

    old = threading.Thread(target=run_old, name="old")
    old.start()
    assert paused.wait(120), "the old attempt never reached its fourth part"

    write_prompts(tmp_path / "in" / "a.parquet", 100, start=1000)  # the input changes: a new job
    new = text_job(tiny_lm, tmp_path).run()
    resume.set()
    old.join(120)
    assert not old.is_alive() and isinstance(old_error[0], Superseded), old_error

    if frozen == "inside a write":  # its one write was taken back: the next attempt redoes that part
        assert len(list(out.glob("part-*.parquet"))) == 9
        new = text_job(tiny_lm, tmp_path).run()
    assert sorted(pd.read_parquet(out).id) == list(range(1000, 1100))
    assert commit_fingerprints(out) == {new["fingerprint"]}
    assert json.loads((out / "_manifest.json").read_text())["fingerprint"] == new["fingerprint"]
    assert set(new["checksums"]) == set(new["parts"]) and len(new["parts"]) == 10


@pytest.mark.timeout(300)
def test_two_writers_starting_together_agree_on_the_drawn_seed(tiny_lm, tmp_path):
    write_prompts(tmp_path / "in" / "a.parquet", 30)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "airflow_hfllm.cli", "text", "--model", tiny_lm, "--input", str(tmp_path / "in"),
               "--output", str(out), "--chunk-rows", "5", "--max-new-tokens", "3", "--sample"]
    writers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [w.communicate(timeout=240) for w in writers]
    for writer, (stdout, stderr) in zip(writers, results):
        # Each either finished, or stopped because the other committed over its parts: never a crash.
        assert writer.returncode == 0 or "Superseded" in stderr, stderr[-3000:]
    if not any(w.returncode == 0 for w in writers):  # both stopped: the retry finishes
        subprocess.run(command, check=True, capture_output=True, timeout=240)
    state = json.loads((out / "_job.json").read_text())
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["seed"] == state["seed"]
    seeds = {json.loads(pq.read_schema(p).metadata[b"hfllm"])["generation"]["seed"] for p in out.glob("part-*.parquet")}
    assert seeds == {state["seed"]}
    assert sorted(pd.read_parquet(out).id) == list(range(30))


def shard_run(tiny_lm, tmp_path, shards: int) -> dict:
    plan = plan_shards(Dataset.open(str(tmp_path / "in")), chunk_rows=5, shards=shards)
    for shard in plan:
        text_job(tiny_lm, tmp_path, chunk_rows=5, shard=shard).run()
    return merge_shards(OutputDir(*to_fs(str(tmp_path / "out")))).to_dict()


def test_sharded_rerun_with_fewer_shards_after_the_input_changed(tiny_lm, tmp_path):
    write_prompts(tmp_path / "in" / "a.parquet", 40)
    shard_run(tiny_lm, tmp_path, shards=4)
    write_prompts(tmp_path / "in" / "a.parquet", 40, start=500)
    manifest = shard_run(tiny_lm, tmp_path, shards=2)
    assert manifest["counts"]["rows"] == 40 and len(manifest["shards"]) == 2
    assert sorted(pd.read_parquet(tmp_path / "out").id) == list(range(500, 540))
    assert sorted(p.name for p in (tmp_path / "out" / "_shards").iterdir()) == [
        "shard-00000.job.json", "shard-00000.json", "shard-00001.job.json", "shard-00001.json"]


def test_sharded_rerun_after_the_input_shrank_leaves_no_stale_parts(tiny_lm, tmp_path):
    write_prompts(tmp_path / "in" / "a.parquet", 40)
    shard_run(tiny_lm, tmp_path, shards=2)
    write_prompts(tmp_path / "in" / "a.parquet", 12)
    manifest = shard_run(tiny_lm, tmp_path, shards=2)
    assert manifest["counts"]["rows"] == 12
    assert sorted(pd.read_parquet(tmp_path / "out").id) == list(range(12))


def test_an_old_manifest_is_gone_while_shards_rebuild_the_folder(tiny_lm, tmp_path):
    write_prompts(tmp_path / "in" / "a.parquet", 20)
    shard_run(tiny_lm, tmp_path, shards=2)
    write_prompts(tmp_path / "in" / "a.parquet", 20, start=100)
    plan = plan_shards(Dataset.open(str(tmp_path / "in")), chunk_rows=5, shards=2)
    text_job(tiny_lm, tmp_path, chunk_rows=5, shard=plan[0]).run()
    assert not (tmp_path / "out" / "_manifest.json").exists()  # half rebuilt: no manifest claims it
