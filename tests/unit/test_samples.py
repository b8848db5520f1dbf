"""num_return_sequences: one output row per sample with a 'sample' column, each sample seeded from
(seed, id, sample) so it does not depend on its batch; a run killed mid-way resumes with every
(id, sample) once."""

import json
import sys

import pandas as pd
import pyarrow.parquet as pq
import pytest

from airflow_hfllm.config import GenerationParams, ModelSpec
from airflow_hfllm.run.job import TextJob
from tests.conftest import kill_after_first_part, rerun_leaves, write_prompts


def run(tiny_lm, tmp_path, out, n, **kw):
    params = GenerationParams(max_new_tokens=12, seed=5, num_return_sequences=n, temperature=2.0, top_k=0, top_p=1.0)
    return TextJob(input=str(tmp_path / "in"), output=str(tmp_path / out), model=ModelSpec(tiny_lm), params=params,
                   chunk_rows=4, engine="fast", batch_size=kw.pop("batch_size", 6), **kw).run()


def test_one_row_per_sample(tiny_lm, tmp_path):
    write_prompts(tmp_path / "in" / "a.parquet", 6, topic=list("abcdef"))
    one = run(tiny_lm, tmp_path, "one", 1, keep_columns=["topic"])
    three = run(tiny_lm, tmp_path, "three", 3, keep_columns=["topic"], batch_size=4)
    assert one["counts"]["rows"] == 6 and three["counts"]["rows"] == 18 and three["input"]["rows"] == 6
    assert three["fingerprint"] != one["fingerprint"]
    assert "sample" not in pd.read_parquet(tmp_path / "one").columns  # one sample: the schema as before
    assert pq.read_schema(tmp_path / "three" / "part-00000.parquet").names[:3] == ["id", "sample", "output"]

    rows = pd.read_parquet(tmp_path / "three").sort_values(["id", "sample"])
    assert list(zip(rows.id, rows["sample"])) == [(i, k) for i in range(6) for k in range(3)]
    assert list(rows.topic) == [t for t in "abcdef" for _ in range(3)]  # keep columns follow their row
    per_id = rows.groupby("id").output.nunique()
    assert (per_id >= 2).sum() >= 5  # the samples of a prompt differ
    # Sample 0 is what one sample was, although the batches differed (6 slots against 4).
    first = rows[rows["sample"] == 0].set_index("id").output
    assert first.to_dict() == pd.read_parquet(tmp_path / "one").set_index("id").output.to_dict()


def test_greedy_samples_are_refused():
    with pytest.raises(ValueError, match="needs do_sample=True"):
        GenerationParams(do_sample=False, num_return_sequences=2)


def test_kill_9_then_rerun_gives_every_sample_once(tiny_lm, tmp_path):
    write_prompts(tmp_path / "in.parquet", 400)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "airflow_hfllm.cli", "text", "--model", tiny_lm, "--input", str(tmp_path / "in.parquet"),
           "--output", str(out), "--max-new-tokens", "8", "--chunk-rows", "10", "--seed", "7",
           "--num-return-sequences", "2"]
    written = kill_after_first_part(cmd, out)
    assert written and len(written) < 40, "killed mid-run"

    rerun_leaves(cmd, out, written)
    rows = pd.read_parquet(out)
    assert sorted(zip(rows.id, rows["sample"])) == [(i, k) for i in range(400) for k in range(2)]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["counts"]["rows"] == 800 and manifest["generation"]["num_return_sequences"] == 2
