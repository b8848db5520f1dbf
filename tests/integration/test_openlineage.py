"""OpenLineage: the provider's listener picks up the operators' datasets and facets in a real Airflow
run (dag.test, file transport), and no prompt, output, system prompt or token leaks into the events."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import write_prompts
from tests.integration.test_example_dag import prompts_with_one_blocked, run_dag

pytestmark = pytest.mark.integration
pytest.importorskip("airflow.providers.openlineage", reason="apache-airflow-providers-openlineage (dev extra)")

TOKEN = "hf_lineageCanaryToken0123456789"
HUB_ID = "hfllm-test/tiny-chat"
SYSTEM_PROMPT = "You are a concise assistant."  # the daily DAG's


def hub_cache(model_dir: str, root: Path) -> Path:
    """A HuggingFace hub cache holding the tiny model as ``HUB_ID``: the task loads it by hub id, offline."""
    commit = "0" * 40
    repo = root / ("models--" + HUB_ID.replace("/", "--"))
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return root


def events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_listener_emits_datasets_counts_and_no_text(models, tmp_path):
    demo = tmp_path / "demo"
    df = prompts_with_one_blocked(tmp_path, demo / "input" / "prompts.parquet", 30, 4, "how do I make explosives")
    classifier = models("classifier-safety", "safe")
    cache = hub_cache(models("causal-lm"), tmp_path / "hub")
    log_file = tmp_path / "openlineage.jsonl"
    connection = {"conn_type": "huggingface", "password": TOKEN, "extra": {"cache_dir": str(cache), "offline": True}}
    result, logs = run_dag(
        tmp_path, "hfllm_text_daily", "2026-11-20",
        conf={"model": HUB_ID, "input": str(demo / "input"), "output": str(demo / "output")},
        HFLLM_SAFETY=f"classifier:{classifier},blocklist:{tmp_path / 'block.txt'}",
        HFLLM_MAX_NEW_TOKENS="8", HFLLM_CHUNK_ROWS="8",
        AIRFLOW_CONN_HUGGINGFACE_DEFAULT=json.dumps(connection),
        AIRFLOW__OPENLINEAGE__TRANSPORT=json.dumps({"type": "file", "log_file_path": str(log_file), "append": True}),
        AIRFLOW__OPENLINEAGE__NAMESPACE="hfllm-test",
    )
    assert result["state"].endswith("success"), logs[-3000:]
    assert log_file.exists(), "the OpenLineage listener wrote no events:\n" + logs[-3000:]
    emitted = events(log_file)
    task_events = {e["eventType"]: e for e in emitted if e["job"]["name"] == "hfllm_text_daily.generate"}
    assert {"START", "COMPLETE"} <= set(task_events), sorted((e["eventType"], e["job"]["name"]) for e in emitted)
    out_dir = str(demo / "output" / "ds=2026-11-20")

    # START: the datasets, with templates rendered (conf values, the run's ds)
    start = task_events["START"]
    assert [(d["namespace"], d["name"]) for d in start["inputs"]] == [("file", str(demo / "input")),
                                                                      ("huggingface", HUB_ID)]
    assert [(d["namespace"], d["name"]) for d in start["outputs"]] == [("file", out_dir)]

    # COMPLETE: plus safety models, statistics, schema and the run's counts
    complete = task_events["COMPLETE"]
    inputs = {(d["namespace"], d["name"]): d for d in complete["inputs"]}
    # a blocklist has no model: no dataset (and its terms stay out of the events)
    assert list(inputs) == [("file", str(demo / "input")), ("huggingface", HUB_ID), ("file", classifier)]
    assert inputs[("file", str(demo / "input"))]["inputFacets"]["inputStatistics"]["rowCount"] == 30
    model = inputs[("huggingface", HUB_ID)]["facets"]["hfllm_model"]
    assert model["role"] == "generator" and model["dtype"] == "auto" and "quantization" not in model  # None is left out
    assert inputs[("file", classifier)]["facets"]["hfllm_model"] == {
        **inputs[("file", classifier)]["facets"]["hfllm_model"], "role": "safety", "checker": "classifier"}
    [output] = complete["outputs"]
    assert (output["namespace"], output["name"]) == ("file", out_dir)
    assert output["outputFacets"]["outputStatistics"]["rowCount"] == 30
    assert output["outputFacets"]["outputStatistics"]["fileCount"] == 4
    columns = {f["name"]: f["type"] for f in output["facets"]["schema"]["fields"]}
    assert list(columns)[:4] == ["id", "output", "finish_reason", "prompt_safe"]
    assert columns["id"] == "int64" and columns["output_tokens"] == "int32"
    run = complete["run"]["facets"]["hfllm_generation"]
    manifest = result["xcom"]["generate"]
    assert run["counts"] == {"rows": 30, "generated": 29, "unsafe_prompt": 1, "unsafe_output": 0, "errors": 0}
    assert run["tokens"] == manifest["tokens"] and run["tokens"]["output"] > 0
    assert run["fingerprint"] == manifest["fingerprint"] and run["parts"] == 4 and run["engine"] == "batched-generate"
    assert run["generation"]["max_new_tokens"] == 8 and run["generation"]["seed"] == 1234
    assert run["safety_checkers"] == ["classifier", "blocklist"]

    # nothing of the rows, the system prompt or the token in any event
    text = log_file.read_text()
    outputs = [o for o in pd.read_parquet(out_dir).output.dropna() if len(o) >= 12]
    assert len(outputs) >= 5, "too few long outputs to make the no-output-text check meaningful"
    leaked = [s for s in [TOKEN, SYSTEM_PROMPT, "how do I make explosives", *df.prompt, *outputs] if s in text]
    assert not leaked, f"{len(leaked)} secret or row strings found in the OpenLineage events"


def test_a_run_failed_on_its_error_rate_reports_its_counts(models, tmp_path):
    """Over max_error_rate the task fails after writing everything: the FAIL event carries the
    output's statistics and the counts, so lineage says how many rows ended in error."""
    demo = tmp_path / "demo"
    df = write_prompts(demo / "input" / "prompts.parquet", 20)
    df.loc[[3, 11], "prompt"] = None  # 2 of 20 rows end in error: 10% > 5%
    df.to_parquet(demo / "input" / "prompts.parquet", index=False)
    log_file = tmp_path / "openlineage.jsonl"
    result, logs = run_dag(
        tmp_path, "hfllm_text_daily", "2026-11-20",
        conf={"model": models("causal-lm"), "input": str(demo / "input"), "output": str(demo / "output")},
        HFLLM_MAX_NEW_TOKENS="4", HFLLM_CHUNK_ROWS="8", HFLLM_MAX_ERROR_RATE="0.05",
        AIRFLOW__OPENLINEAGE__TRANSPORT=json.dumps({"type": "file", "log_file_path": str(log_file), "append": True}),
    )
    assert result["state"] == "failed", logs[-3000:]
    assert "2 of 20 rows ended in error" in logs
    task_events = [e for e in events(log_file) if e["job"]["name"] == "hfllm_text_daily.generate"]
    assert [e["eventType"] for e in task_events] == ["START", "FAIL"]  # no retries: the same input fails again
    fail = task_events[-1]
    assert fail["run"]["facets"]["hfllm_generation"]["counts"] == {
        "rows": 20, "generated": 18, "unsafe_prompt": 0, "unsafe_output": 0, "errors": 2}
    [output] = fail["outputs"]
    assert output["outputFacets"]["outputStatistics"]["rowCount"] == 20
    assert len(pd.read_parquet(demo / "output" / "ds=2026-11-20")) == 20  # written before failing


def test_sharded_dag_plan_and_merge_lineage(models, tmp_path):
    demo = tmp_path / "demo"
    write_prompts(demo / "input" / "a.parquet", 12)
    log_file = tmp_path / "openlineage.jsonl"
    result, logs = run_dag(
        tmp_path, "hfllm_text_sharded", "2026-11-20",
        HFLLM_DEMO_DIR=str(demo), HFLLM_MODEL=models("causal-lm"), HFLLM_CHUNK_ROWS="5", HFLLM_SHARDS="2",
        HFLLM_MAX_NEW_TOKENS="4",
        AIRFLOW__OPENLINEAGE__TRANSPORT=json.dumps({"type": "file", "log_file_path": str(log_file), "append": True}),
    )
    assert result["state"].endswith("success"), logs[-3000:]
    complete = {}
    for e in events(log_file):
        if e["eventType"] == "COMPLETE" and "." in e["job"]["name"]:  # tasks, not the DAG run
            facets = e["run"]["facets"]
            shard = facets.get("hfllm_generation", {}).get("shard")
            complete[e["job"]["name"].split(".", 1)[1] + ("" if shard is None else f"[{shard}]")] = e
    out_dir = str(demo / "output-sharded" / "ds=2026-11-20")
    assert [(d["namespace"], d["name"]) for d in complete["plan"]["inputs"]] == [("file", str(demo / "input"))]
    # each shard reports its own rows; the merge reports the whole output
    shard_rows = [complete[f"generate[{i}]"]["run"]["facets"]["hfllm_generation"]["counts"]["rows"] for i in (0, 1)]
    assert sum(shard_rows) == 12 and min(shard_rows) > 0
    [merged] = complete["merge"]["outputs"]
    assert (merged["namespace"], merged["name"]) == ("file", out_dir)
    assert merged["outputFacets"]["outputStatistics"] == {**merged["outputFacets"]["outputStatistics"],
                                                          "rowCount": 12, "fileCount": 3}
    assert complete["merge"]["run"]["facets"]["hfllm_generation"]["counts"]["rows"] == 12


def test_dataset_names_follow_the_openlineage_naming_spec(tmp_path):
    from airflow_hfllm.operators.lineage import dataset_id, model_id

    assert dataset_id("s3://aws_default@bucket/prompts/ds=2026-11-20/") == ("s3://bucket", "prompts/ds=2026-11-20")
    assert dataset_id("file:///data/in/*.parquet") == ("file", "/data/in")
    assert dataset_id("/data/in/part-*.parquet") == ("file", "/data/in")
    assert dataset_id("/data/in/prompts.parquet") == ("file", "/data/in/prompts.parquet")
    assert model_id("Qwen/Qwen2.5-7B-Instruct") == ("huggingface", "Qwen/Qwen2.5-7B-Instruct")
    assert model_id(str(tmp_path)) == ("file", str(tmp_path))
    assert model_id("s3://models/qwen") == ("s3://models", "qwen")


def test_dag_parsing_does_not_import_lineage():
    """The lineage module and the OpenLineage client load only when the listener asks for facets
    (Airflow itself reads the provider's info at parse time: not ours to avoid)."""
    root = Path(__file__).resolve().parents[2]
    code = ("import runpy, sys; runpy.run_path(sys.argv[1]); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'openlineage' or m.endswith('.lineage') "
            "or m.startswith('airflow.providers.openlineage.extractors')))")
    done = subprocess.run([sys.executable, "-c", code, str(root / "dags" / "hfllm_text_ui.py")],
                          capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_model_facet_names_revision_quantization_and_adapter():
    from openlineage.client.serde import Serde

    from airflow_hfllm.operators.lineage import generate_lineage

    spec = {"model": "Qwen/Qwen2.5-7B-Instruct", "revision": "abc123", "dtype": "bfloat16", "quantization": "4bit",
            "adapter": "my-org/support-lora"}
    lineage = generate_lineage("s3://aws_default@bucket/prompts/", "s3://aws_default@bucket/out/ds=1/", spec)
    inputs = [json.loads(Serde.to_json(d)) for d in lineage.inputs]
    assert [(d["namespace"], d["name"]) for d in inputs] == [
        ("s3://bucket", "prompts"), ("huggingface", "Qwen/Qwen2.5-7B-Instruct"), ("huggingface", "my-org/support-lora")]
    facet = inputs[1]["facets"]["hfllm_model"]
    assert {k: facet[k] for k in ("role", "revision", "dtype", "quantization", "adapter")} == {
        "role": "generator", "revision": "abc123", "dtype": "bfloat16", "quantization": "4bit",
        "adapter": "my-org/support-lora"}
    assert facet["_schemaURL"].startswith("urn:") and inputs[2]["facets"]["hfllm_model"]["role"] == "adapter"
    assert [(d.namespace, d.name) for d in lineage.outputs] == [("s3://bucket", "out/ds=1")]
