"""The sharded example DAG on a Celery deployment: triggered over the REST API with the shard count in
its conf, 4 shards on queue ``gpu`` spread over two workers, merged into one output."""

import json

import pandas as pd
import pytest

pytestmark = pytest.mark.e2e

DAG = "hfllm_text_sharded"


def test_shards_run_on_both_workers_and_merge_every_id_once(cluster):
    run_id = "e2e-sharded"
    cluster.trigger(DAG, run_id, "2026-11-20T00:00:00Z", conf={"shards": 4})
    cluster.wait_run(DAG, run_id, timeout=360)

    tis = cluster.task_instances(DAG, run_id)
    assert {ti["state"] for ti in tis} == {"success"}, cluster.run_report(DAG, run_id)
    shards = [ti for ti in tis if ti["task_id"] == "generate"]
    # 4 from the conf, not the DAG's default of 2 (the cluster sets HFLLM_SHARDS=2)
    assert sorted(ti["map_index"] for ti in shards) == [0, 1, 2, 3]
    assert sorted(ti["rendered_map_index"] for ti in shards) == [f"shard {i}" for i in range(4)]
    assert {(ti["queue"], ti["pool"]) for ti in shards} == {("gpu", "gpu")}
    # Each worker reports its own name as the task hostname: both took shards.
    hosts = {ti["hostname"] for ti in shards}
    assert hosts == set(cluster.workers), cluster.run_report(DAG, run_id)

    out = cluster.demo / "output-sharded" / "ds=2026-11-20"
    manifest = json.loads((out / "_manifest.json").read_text())
    merged = cluster.rest("GET", f"/api/v2/dags/{DAG}/dagRuns/{run_id}/taskInstances/merge/xcomEntries/return_value")
    assert merged["value"]["fingerprint"] == manifest["fingerprint"]
    assert len(manifest["shards"]) == 4 and manifest["counts"]["rows"] == cluster.input_rows
    assert manifest["counts"]["errors"] == 0 and manifest["counts"]["generated"] == cluster.input_rows
    parts = sorted(p.name for p in out.glob("part-*.parquet"))
    assert parts == manifest["parts"] == [f"part-{i:05d}.parquet" for i in range(4)]

    ids = pd.concat([pd.read_parquet(out / p, columns=["id", "output_tokens"]) for p in parts])
    expected = pd.read_parquet(cluster.demo / "input", columns=["id"]).id
    assert ids.id.is_unique and sorted(ids.id) == sorted(expected)
    assert (ids.output_tokens > 0).all()
