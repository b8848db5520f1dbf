"""SIGTERM to a running task: on_kill stops generation between batches and the task fails; parts
already written stay for the retry, and no manifest claims the output is complete."""

import json
import os
import signal
import subprocess
import sys
import time
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

with DAG(dag_id="hfllm_kill", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")):
    HFTextGenerateOperator(task_id="generate", base_model={model!r}, input_path={input!r}, output_path={output!r},
                           max_new_tokens=16, chunk_rows=10, batch_size=2, do_sample=False, retries=0)
'''


def test_sigterm_calls_on_kill_and_fails_the_task(tiny_lm, tmp_path):
    write_prompts(tmp_path / "in.parquet", 2000)
    out = tmp_path / "out"
    (tmp_path / "dags").mkdir()
    (tmp_path / "dags" / "kill_dag.py").write_text(
        DAG.format(model=tiny_lm, input=str(tmp_path / "in.parquet"), output=str(out)))
    env = dict(os.environ, AIRFLOW_HOME=str(tmp_path / "airflow"), AIRFLOW__CORE__DAGS_FOLDER=str(tmp_path / "dags"),
               AIRFLOW__CORE__LOAD_EXAMPLES="False", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "integration" / "dag_runner.py"), "hfllm_kill",
                             "2026-11-20", "{}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not (out / "_commits" / "part-00000.json").exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    line = next((ln for ln in stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, stdout[-3000:]
    result = json.loads(line[7:])
    assert result["tasks"]["generate"].endswith("failed"), result
    assert "generation stopped by on_kill" in stdout
    parts = sorted(out.glob("part-*.parquet"))
    assert 1 <= len(parts) < 200
    assert not (out / "_manifest.json").exists()
    assert len(pd.read_parquet(parts[0])) == 10
