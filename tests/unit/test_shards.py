"""Sharding: a plan on chunk boundaries, shards writing disjoint parts, one merged manifest."""

import json

import pandas as pd
import pytest

from airflow_hfllm.config import GenerationParams, ModelSpec
from airflow_hfllm.io.dataset import Dataset, InputError, to_fs
from airflow_hfllm.io.parts import OutputDir
from airflow_hfllm.run.manifest import merge_shards
from airflow_hfllm.run.shards import plan_shards
from airflow_hfllm.run.job import TextJob
from tests.conftest import write_prompts

SAMPLE = GenerationParams(max_new_tokens=8, do_sample=True, temperature=1.0)


def test_plan_is_balanced_and_covers_every_chunk(tmp_path):
    write_prompts(tmp_path / "a.parquet", 95)
    plan = plan_shards(Dataset.open(str(tmp_path / "a.parquet")), chunk_rows=10, shards=4, seed=5)
    assert [(s["first_chunk"], s["end_chunk"]) for s in plan] == [(0, 3), (3, 5), (5, 8), (8, 10)]
    assert sum(s["rows"] for s in plan) == 95 and all(s["seed"] == 5 for s in plan)
    assert len(plan_shards(Dataset.open(str(tmp_path / "a.parquet")), chunk_rows=50, shards=8)) == 2
    write_prompts(tmp_path / "b.parquet", 3, start=90)
    with pytest.raises(InputError, match="duplicate ids"):
        Dataset.open(str(tmp_path / "*.parquet"))


def test_shards_write_disjoint_parts_and_merge(tiny_lm, tmp_path):
    write_prompts(tmp_path / "in.parquet", 47)
    dataset = Dataset.open(str(tmp_path / "in.parquet"))
    plan = plan_shards(dataset, chunk_rows=5, shards=3)

    def shard_job(shard):
        return TextJob(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"), model=ModelSpec(tiny_lm),
                       params=SAMPLE, chunk_rows=5, shard=shard)

    summaries = [shard_job(s).run() for s in reversed(plan)]  # order does not matter
    assert not (tmp_path / "out" / "_manifest.json").exists()
    assert sorted(s["shard"]["index"] for s in summaries) == [0, 1, 2]
    manifest = merge_shards(OutputDir(*to_fs(str(tmp_path / "out")))).to_dict()
    assert manifest["counts"]["rows"] == 47 and len(manifest["parts"]) == 10 and len(manifest["shards"]) == 3
    assert json.loads((tmp_path / "out" / "_manifest.json").read_text()) == manifest
    sharded = pd.read_parquet(tmp_path / "out").sort_values("id").reset_index(drop=True)
    assert sharded.id.tolist() == list(range(47))

    # The same job unsharded, with the planner's seed: the same rows come out.
    whole = TextJob(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "whole"), model=ModelSpec(tiny_lm),
                    params=SAMPLE.replace(seed=plan[0]["seed"]), chunk_rows=5).run()
    assert whole["fingerprint"] == manifest["fingerprint"]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "whole").sort_values("id").reset_index(drop=True),
                                  sharded)

    # A shard's retry touches its own parts only.
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("part-*.parquet")}
    (tmp_path / "out" / "part-00004.parquet").unlink()  # shard 1's
    again = shard_job(plan[1]).run()
    assert again["counts"]["rows"] == plan[1]["rows"]
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("part-*.parquet")}
    assert {k for k in after if after[k] != stamps.get(k)} == {"part-00004.parquet"}
    assert merge_shards(OutputDir(*to_fs(str(tmp_path / "out")))).to_dict()["counts"]["rows"] == 47


def test_merge_refuses_missing_parts(tiny_lm, tmp_path):
    write_prompts(tmp_path / "in.parquet", 20)
    plan = plan_shards(Dataset.open(str(tmp_path / "in.parquet")), chunk_rows=5, shards=2)
    TextJob(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"), model=ModelSpec(tiny_lm),
            params=SAMPLE, chunk_rows=5, shard=plan[0]).run()
    with pytest.raises(RuntimeError, match="parts missing"):
        merge_shards(OutputDir(*to_fs(str(tmp_path / "out")))).to_dict()
    assert not (tmp_path / "out" / "_manifest.json").exists()
