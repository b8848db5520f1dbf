"""prompt_template through real Airflow (dag.test(), SQLite): the task's context ({{ ds }}, {{ params.x }})
and the row ({{ row.text | filter }}) in one template, rendered per row by the job; a column the input
lacks fails the task up front."""

import json
import sqlite3
import textwrap

import pandas as pd
import pytest

from tests.integration.test_example_dag import run_dag

pytestmark = pytest.mark.integration

TEMPLATE = "{{ ds }} ({{ params.tone }}): {{ row.text | replace('apple', 'fig') }}"

DAG_FILE = '''
import pendulum
from airflow.sdk import DAG

from airflow_hfllm.operators.text import HFTextGenerateOperator


def blocklist(term, category):
    return {{"kind": "blocklist", "terms": [term], "category": category}}


with DAG(dag_id="hfllm_prompt_template", schedule=None, start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
         params={{"tone": "plain"}}):
    common = dict(base_model={model!r}, input_path={input!r}, prompt_column=None, max_new_tokens=4,
                  do_sample=False, max_error_rate=0)
    HFTextGenerateOperator(
        task_id="generate", output_path={output!r} + "/ds={{{{ ds }}}}", prompt_template={template!r},
        # every prompt holds the date and the tone; only rows whose text had "apple" hold "fig"
        safety_checkers=[blocklist("2026-11-21", "date"), blocklist("sarcastic", "tone"), blocklist("fig", "topic")],
        **common)
    HFTextGenerateOperator(task_id="missing_column", output_path={output!r} + "/missing",
                           prompt_template="{{{{ ds }}}}: {{{{ row.summary }}}}", **common)
'''


def test_template_reads_the_airflow_context_and_each_row(models, tmp_path):
    (tmp_path / "input").mkdir()
    texts = ["a red apple", "a green pear", "apple pie", "plain bread"]
    pd.DataFrame({"id": range(4), "text": texts}).to_parquet(tmp_path / "input" / "rows.parquet", index=False)
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "prompt_template_dag.py").write_text(textwrap.dedent(DAG_FILE.format(
        model=models("causal-lm"), input=str(tmp_path / "input"), output=str(tmp_path / "out"), template=TEMPLATE)))

    result, logs = run_dag(tmp_path, "hfllm_prompt_template", "2026-11-21", conf={"tone": "sarcastic"}, dags=dags)
    assert result["tasks"]["generate"] == "success", logs[-5000:]
    manifest = result["xcom"]["generate"]
    assert manifest["counts"]["rows"] == 4 and manifest["counts"]["unsafe_prompt"] == 4

    rows = pd.read_parquet(tmp_path / "out" / "ds=2026-11-21").set_index("id").sort_index()
    assert (rows.finish_reason == "unsafe_prompt").all()
    flagged = {i: sorted(c for v in rows.loc[i, "prompt_safety"] for c in v["categories"]) for i in rows.index}
    assert flagged == {0: ["date", "tone", "topic"], 1: ["date", "tone"], 2: ["date", "tone", "topic"],
                       3: ["date", "tone"]}

    # Up front: the task fails on the missing column (no retry), naming it and the input file.
    assert result["tasks"]["missing_column"] == "failed"
    assert f"{tmp_path / 'input' / 'rows.parquet'}: prompt_template reads column 'summary'" in logs
    assert not (tmp_path / "out" / "missing").exists()

    # The UI's Rendered Templates tab: the other fields rendered, the prompt template as the job applies it.
    with sqlite3.connect(tmp_path / "airflow" / "airflow.db") as db:
        [(fields,)] = db.execute("select rendered_fields from rendered_task_instance_fields "
                                 "where dag_id = 'hfllm_prompt_template' and task_id = 'generate'").fetchall()
    fields = json.loads(fields)
    assert fields["prompt_template"] == TEMPLATE
    assert fields["output_path"] == str(tmp_path / "out" / "ds=2026-11-21")
