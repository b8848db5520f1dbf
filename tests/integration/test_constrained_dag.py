"""Constrained outputs from a real DAG run (dag.test(), SQLite): json_schema as a dict and as a file path,
and choices as a list, all from the operator's arguments (mapped with expand_kwargs)."""

import json
import textwrap

import jsonschema
import pandas as pd
import pytest

from tests.integration.test_example_dag import run_dag
from tests.unit.test_constrained import SCHEMA

pytestmark = pytest.mark.integration

DAG_FILE = '''
import pendulum
from airflow.sdk import DAG

from airflow_hfllm.operators.text import HFTextGenerateOperator

with DAG(dag_id="hfllm_constrained", schedule=None, start_date=pendulum.datetime(2026, 11, 1, tz="UTC")):
    HFTextGenerateOperator.partial(
        task_id="generate", base_model={model!r}, input_path={input!r}, max_new_tokens=256,
    ).expand_kwargs([{{"output_path": {output!r} + "/dict", "json_schema": {schema!r}}},
                     {{"output_path": {output!r} + "/file", "json_schema": {schema_file!r}}},
                     {{"output_path": {output!r} + "/choices", "choices": ["red", "green", "blue"]}}])
'''


def test_constraints_from_the_operator(models, tmp_path):
    (tmp_path / "input").mkdir()
    pd.DataFrame({"id": range(8), "prompt": [f"Describe pet {i}" for i in range(8)]}).to_parquet(
        tmp_path / "input" / "rows.parquet", index=False)
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "constrained_dag.py").write_text(textwrap.dedent(DAG_FILE.format(
        model=models("causal-lm"), input=str(tmp_path / "input"), output=str(tmp_path / "out"), schema=SCHEMA,
        schema_file=str(tmp_path / "schema.json"))))

    result, logs = run_dag(tmp_path, "hfllm_constrained", "2026-11-21", dags=dags)
    assert result["state"] == "success", logs[-5000:]
    # the schema read from the file is the dict: the same parameters, the same fingerprint
    xcom = result["xcom"]
    assert xcom["generate[0]"]["generation"]["json_schema"] == xcom["generate[1]"]["generation"]["json_schema"] == SCHEMA
    assert xcom["generate[0]"]["fingerprint"] == xcom["generate[1]"]["fingerprint"]
    assert xcom["generate[2]"]["generation"]["choices"] == ["red", "green", "blue"]
    for name in ("dict", "file"):
        out = pd.read_parquet(tmp_path / "out" / name)
        assert len(out) == 8
        for text in out.output:
            jsonschema.validate(json.loads(text), SCHEMA)
    assert set(pd.read_parquet(tmp_path / "out" / "choices").output) <= {"red", "green", "blue"}
