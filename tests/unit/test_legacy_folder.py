"""An output folder written by an earlier layout of the package resumes under this one: the
fingerprint and the state records (``_job.json``, ``_commits/``) are the compatibility surface."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pyarrow.parquet as pq

from airflow_hfllm.config import GenerationParams, ModelSpec
from airflow_hfllm.run.job import TextJob
from airflow_hfllm.testing.models import make_tiny_model

LEGACY = Path(__file__).parent.parent / "data" / "legacy-v1"
# Where the fixture was written: the input's resolved path is part of the fingerprint.
PLACE = Path("/tmp/hfllm-legacy-v1")


def test_folder_from_the_previous_layout_resumes(monkeypatch, caplog):
    shutil.rmtree(PLACE, ignore_errors=True)
    PLACE.mkdir()
    shutil.copy(LEGACY / "input.parquet", PLACE / "input.parquet")
    shutil.copytree(LEGACY / "output", PLACE / "output")
    monkeypatch.chdir(PLACE)
    make_tiny_model("model", "causal-lm", seed=0)
    old_manifest = json.loads((PLACE / "output" / "_manifest.json").read_text())
    kept = {name: (PLACE / "output" / name).read_bytes() for name in ("part-00000.parquet", "part-00002.parquet")}
    lost = pq.read_table(PLACE / "output" / "part-00001.parquet")
    # A worker died before committing chunk 1: its part and commit record are gone.
    (PLACE / "output" / "part-00001.parquet").unlink()
    (PLACE / "output" / "_commits" / "part-00001.json").unlink()
    (PLACE / "output" / "_manifest.json").unlink()

    caplog.set_level(logging.INFO, logger="airflow_hfllm")
    manifest = TextJob(input="input.parquet", output="output", model=ModelSpec("model"),
                       params=GenerationParams(max_new_tokens=6, seed=7), chunk_rows=2, keep_columns=["topic"],
                       system_prompt="Be brief.", input_fingerprint="content", engine="batched").run()

    assert "2 chunks already done, 1 to do" in caplog.text
    assert "rebuilding" not in caplog.text
    assert manifest["fingerprint"] == old_manifest["fingerprint"]
    assert manifest["seed"] == 7
    assert manifest["parts"] == old_manifest["parts"]
    assert manifest["counts"] == old_manifest["counts"]
    for name, data in kept.items():  # untouched, byte for byte
        assert (PLACE / "output" / name).read_bytes() == data
    redone = pq.read_table(PLACE / "output" / "part-00001.parquet")
    assert redone.column("output").to_pylist() == lost.column("output").to_pylist()
    assert redone.column("id").to_pylist() == [2, 3]
