"""A generation parameter added in config.py alone (presence_penalty, frequency_penalty) works from
both interfaces: a real DAG run (dag.test(), SQLite), with one of them from the DAG's default_args and
one mapped with expand(), and the CLI, which give the same rows; the penalties change the outputs."""

import json
import subprocess
import sys
import textwrap

import pandas as pd
import pytest

from tests.integration.test_example_dag import run_dag

pytestmark = pytest.mark.integration

DAG_FILE = '''
import pendulum
from airflow.sdk import DAG

from airflow_hfllm.operators.text import HFTextGenerateOperator

with DAG(dag_id="hfllm_penalties", schedule=None, start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
         default_args={{"frequency_penalty": 1.5}}):
    HFTextGenerateOperator.partial(
        task_id="generate", base_model={model!r}, input_path={input!r}, max_new_tokens=24, do_sample=False,
        engine="batched",
    ).expand_kwargs([{{"output_path": {output!r} + "/on", "presence_penalty": 0.5}},
                     {{"output_path": {output!r} + "/off", "presence_penalty": 0.0, "frequency_penalty": 0.0}}])
'''


def repeated(outputs) -> float:
    """The share of words that repeat an earlier word of the same output."""
    seen = total = 0
    for text in outputs:
        words = text.split()
        total += len(words)
        seen += len(words) - len(set(words))
    return seen / max(total, 1)


def test_penalties_from_the_operator_and_the_cli(models, tmp_path):
    (tmp_path / "input").mkdir()
    pd.DataFrame({"id": range(8), "prompt": [f"Tell me about item {i}" for i in range(8)]}).to_parquet(
        tmp_path / "input" / "rows.parquet", index=False)
    dags = tmp_path / "dags"
    dags.mkdir()
    model = models("causal-lm")
    (dags / "penalty_dag.py").write_text(textwrap.dedent(DAG_FILE.format(
        model=model, input=str(tmp_path / "input"), output=str(tmp_path / "out"))))

    result, logs = run_dag(tmp_path, "hfllm_penalties", "2026-11-21", dags=dags)
    assert result["state"] == "success", logs[-5000:]
    on, off = result["xcom"]["generate[0]"], result["xcom"]["generate[1]"]
    assert (on["generation"]["presence_penalty"], on["generation"]["frequency_penalty"]) == (0.5, 1.5)
    assert (off["generation"]["presence_penalty"], off["generation"]["frequency_penalty"]) == (0.0, 0.0)
    assert on["fingerprint"] != off["fingerprint"]

    cli = subprocess.run(
        [sys.executable, "-m", "airflow_hfllm.cli", "text", "--model", model, "--input", str(tmp_path / "input"),
         "--output", str(tmp_path / "cli"), "--max-new-tokens", "24", "--no-sample", "--engine", "batched",
         "--presence-penalty", "0.5", "--frequency-penalty", "1.5"], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert json.loads(cli.stdout)["generation"]["frequency_penalty"] == 1.5

    read = {name: pd.read_parquet(tmp_path / name).set_index("id").sort_index().output
            for name in ("out/on", "out/off", "cli")}
    assert read["out/on"].tolist() == read["cli"].tolist()  # one parameter, one meaning, both interfaces
    assert read["out/on"].tolist() != read["out/off"].tolist()
    assert repeated(read["out/on"]) < repeated(read["out/off"])
