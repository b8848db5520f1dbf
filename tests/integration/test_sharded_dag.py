"""The sharded example DAG through real Airflow: plan, 4 mapped shards, merge (dag.test, SQLite)."""

import pandas as pd
import pytest

from tests.conftest import write_prompts
from tests.integration.test_example_dag import run_dag

pytestmark = pytest.mark.integration


def test_sharded_dag_merges_every_id_once(models, tmp_path):
    demo = tmp_path / "demo"
    write_prompts(demo / "input" / "a.parquet", 23)
    write_prompts(demo / "input" / "b.parquet", 19, start=23)
    result, logs = run_dag(tmp_path, "hfllm_text_sharded", "2026-11-20",
                           HFLLM_DEMO_DIR=str(demo), HFLLM_MODEL=models("causal-lm"), HFLLM_CHUNK_ROWS="5",
                           HFLLM_SHARDS="4", HFLLM_MAX_NEW_TOKENS="6")
    assert result["state"].endswith("success"), logs[-3000:]
    assert sorted(k for k in result["tasks"] if k.startswith("generate[")) == [f"generate[{i}]" for i in range(4)]
    assert all(v.endswith("success") for v in result["tasks"].values())
    assert sorted(result["labels"].values()) == [f"shard {i}" for i in range(4)]
    plan = result["xcom"]["plan"]
    assert [p["shard"]["index"] for p in plan] == [0, 1, 2, 3] and sum(p["shard"]["rows"] for p in plan) == 42
    manifest = result["xcom"]["merge"]
    assert manifest["counts"]["rows"] == 42 and len(manifest["parts"]) == 9 and len(manifest["shards"]) == 4
    out = pd.read_parquet(demo / "output-sharded" / "ds=2026-11-20")
    assert sorted(out.id) == list(range(42))
