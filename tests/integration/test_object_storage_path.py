"""The operator with URIs: paths become ObjectStoragePath (here file://), templated per logical date."""

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

DAG = '''
import pendulum
from airflow.sdk import DAG
from airflow_hfllm.operators.text import HFTextGenerateOperator

with DAG(dag_id="hfllm_uri", schedule="@daily", start_date=pendulum.datetime(2026, 11, 1, tz="UTC"), catchup=False):
    HFTextGenerateOperator(task_id="generate", base_model={model!r}, input_path="file://{root}/in/{{{{ ds }}}}/",
                           output_path="file://{root}/out/ds={{{{ ds }}}}", max_new_tokens=6, chunk_rows=5,
                           do_sample=False)
'''


def test_uri_paths_through_object_storage_path(tiny_lm, tmp_path):
    write_prompts(tmp_path / "in" / "2026-11-21" / "a.parquet", 12)
    (tmp_path / "dags").mkdir()
    (tmp_path / "dags" / "uri_dag.py").write_text(DAG.format(model=tiny_lm, root=tmp_path))
    env = dict(os.environ, AIRFLOW_HOME=str(tmp_path / "airflow"), AIRFLOW__CORE__DAGS_FOLDER=str(tmp_path / "dags"),
               AIRFLOW__CORE__LOAD_EXAMPLES="False", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "integration" / "dag_runner.py"), "hfllm_uri",
                           "2026-11-21", "{}"], env=env, capture_output=True, text=True, timeout=600)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(line[7:])
    assert result["state"].endswith("success"), result
    manifest = result["xcom"]["generate"]
    assert manifest["counts"]["rows"] == 12 and len(manifest["parts"]) == 3
    out = pd.read_parquet(tmp_path / "out" / "ds=2026-11-21")
    assert sorted(out.id) == list(range(12)) and out.output.notna().all()
