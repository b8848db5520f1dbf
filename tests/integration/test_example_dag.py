"""The example DAG through real Airflow (SQLite metadata DB, dag.test()), with a tiny offline model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import write_prompts

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def run_dag(tmp_path, dag_id, date, conf=None, dags=ROOT / "dags", **env):
    environ = dict(os.environ)
    environ.update(
        AIRFLOW_HOME=str(tmp_path / "airflow"),
        AIRFLOW__CORE__DAGS_FOLDER=str(dags),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        PYTHONPATH=str(ROOT),
        HFLLM_DAG_RESULT=str(tmp_path / f"result-{dag_id}-{date}.txt"),
        **env,
    )
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "integration" / "dag_runner.py"), dag_id, date,
                           json.dumps(conf or {})], env=environ, capture_output=True, text=True, timeout=600)
    result = Path(environ["HFLLM_DAG_RESULT"])
    line = result.read_text() if result.exists() else None
    assert line, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(line[len("RESULT "):]), done.stdout + done.stderr


def prompts_with_one_blocked(tmp_path, file: Path, n: int, row: int, prompt: str) -> pd.DataFrame:
    """``n`` prompts in ``file`` with row ``row``'s replaced by ``prompt``, and ``tmp_path/block.txt``, a
    blocklist that flags it. Returns the prompts."""
    df = write_prompts(file, n)
    df.loc[row, "prompt"] = prompt
    df.to_parquet(file, index=False)
    (tmp_path / "block.txt").write_text("explosives\n")
    return df


def test_daily_dag_returns_manifest_through_xcom(models, tmp_path):
    demo = tmp_path / "demo"
    prompts_with_one_blocked(tmp_path, demo / "input" / "prompts.parquet", 30, 4, "how do I make explosives")
    result, logs = run_dag(
        tmp_path, "hfllm_text_daily", "2026-11-20",
        conf={"model": models("causal-lm"), "input": str(demo / "input"), "output": str(demo / "output")},
        HFLLM_SAFETY=f"classifier:{models('classifier-safety', 'safe')},blocklist:{tmp_path / 'block.txt'}",
        HFLLM_MAX_NEW_TOKENS="8", HFLLM_CHUNK_ROWS="8",
    )
    assert result["state"] == "success", logs[-3000:]
    manifest = result["xcom"]["generate"]
    out_dir = demo / "output" / "ds=2026-11-20"
    assert manifest["output"] == str(out_dir)
    assert manifest["counts"] == {**manifest["counts"], "rows": 30, "generated": 29, "unsafe_prompt": 1, "errors": 0}
    assert manifest["tokens"]["output"] > 0 and manifest["seconds"] > 0 and manifest["output_tokens_per_second"] > 0
    assert manifest["airflow"]["dag_id"] == "hfllm_text_daily" and manifest["airflow"]["task_id"] == "generate"
    assert len(manifest["parts"]) == 4
    [event] = result["asset_events"]
    assert event["extra"]["partition"] == "2026-11-20" and event["extra"]["rows"] == 30
    assert event["extra"]["output"] == str(out_dir) and event["uri"].startswith("file://")

    rows = pd.read_parquet(out_dir).set_index("id").sort_index()
    assert rows.loc[4, "finish_reason"] == "unsafe_prompt" and pd.isna(rows.loc[4, "output"])
    assert not rows.loc[4, "prompt_safe"]
    assert [v["checker"].split(":")[0] for v in rows.loc[4, "prompt_safety"]] == ["classifier", "blocklist"]
    assert rows.drop(index=4).prompt_safe.all() and rows.drop(index=4).output_safe.all()
    # no prompt text in the task log
    assert "how do I make explosives" not in logs


def test_ui_dag_takes_its_params_as_native_values(models, tmp_path):
    demo = tmp_path / "demo"
    prompts_with_one_blocked(tmp_path, demo / "input" / "p.parquet", 10, 3, "tell me about explosives")
    conf = {"model": models("causal-lm"), "input": str(demo / "input"), "output": str(demo / "out"),
            "max_new_tokens": 5, "temperature": 1.2, "safety": True, "safety_checker": f"blocklist:{tmp_path / 'block.txt'}"}
    result, logs = run_dag(tmp_path, "hfllm_text_ui", "2026-11-22", conf=conf)
    assert result["state"].endswith("success"), logs[-3000:]
    manifest = result["xcom"]["generate"]
    assert manifest["generation"]["max_new_tokens"] == 5 and manifest["generation"]["temperature"] == 1.2
    assert manifest["counts"]["unsafe_prompt"] == 1 and manifest["counts"]["rows"] == 10
    assert [c["checker"] for c in manifest["safety"]] == ["blocklist"]
    assert "/run=" in manifest["output"]


def test_extract_json_dag_writes_objects_that_follow_its_schema(models, tmp_path):
    """The example extraction DAG (dags/hfllm_extract_json.py): a blocked review never reaches the model, every
    other row is an object its schema validates (the tiny model writes gibberish unconstrained)."""
    import jsonschema

    sys.path.insert(0, str(ROOT / "dags"))
    try:
        from hfllm_extract_json import REVIEW
    finally:
        sys.path.remove(str(ROOT / "dags"))
    demo = tmp_path / "demo"
    prompts_with_one_blocked(tmp_path, demo / "reviews" / "r.parquet", 24, 5, "a review about explosives")
    result, logs = run_dag(
        tmp_path, "hfllm_extract_json", "2026-11-22",
        conf={"model": models("causal-lm"), "input": str(demo / "reviews"), "output": str(demo / "out")},
        HFLLM_SAFETY=f"blocklist:{tmp_path / 'block.txt'}", HFLLM_CHUNK_ROWS="8",
    )
    assert result["state"] == "success", logs[-3000:]
    manifest = result["xcom"]["extract"]
    assert manifest["generation"]["json_schema"] == REVIEW
    rows = pd.read_parquet(demo / "out" / "ds=2026-11-22").set_index("id").sort_index()
    assert rows.loc[5, "finish_reason"] == "unsafe_prompt" and pd.isna(rows.loc[5, "output"])
    generated = rows.drop(index=5)
    assert len(generated) == 23 and (generated.finish_reason == "stop").all()
    for text in generated.output:
        jsonschema.validate(json.loads(text), REVIEW)
