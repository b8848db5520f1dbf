"""One input spread over several GPU tasks: plan shards, generate them in parallel, merge.

Route the generate tasks to GPU workers: ``queue="gpu"`` (Celery workers started with ``-q gpu``), a
``pool`` with as many slots as GPUs, and ``max_active_tis_per_dagrun`` to cap one run's share. Each
shard writes its own parts into the one output folder; the merge writes ``_manifest.json``.
The shard count is a param: trigger with conf ``{"shards": 8}`` to spread one run wider.
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import DAG, Param

from airflow_hfllm.operators.shards import HFMergeShardsOperator, HFShardPlanOperator
from airflow_hfllm.operators.text import HFTextGenerateOperator

DEMO = os.environ.get("HFLLM_DEMO_DIR", "/tmp/hfllm-demo")
INPUT = os.environ.get("HFLLM_INPUT", f"{DEMO}/input")
OUTPUT = os.environ.get("HFLLM_OUTPUT", f"{DEMO}/output-sharded") + "/ds={{ ds }}"
CHUNK_ROWS = int(os.environ.get("HFLLM_CHUNK_ROWS", "1000"))

with DAG(
    dag_id="hfllm_text_sharded",
    schedule=None,
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    tags=["hfllm", "example"],
    params={"shards": Param(int(os.environ.get("HFLLM_SHARDS", "4")), type="integer", minimum=1,
                            description="how many generate tasks (at most one per input chunk)")},
) as dag:
    plan = HFShardPlanOperator(task_id="plan", input_path=INPUT, shards="{{ params.shards }}", chunk_rows=CHUNK_ROWS,
                               seed=1234)
    generate = HFTextGenerateOperator.partial(
        task_id="generate",
        base_model=os.environ.get("HFLLM_MODEL", f"{DEMO}/models/tiny-chat"),
        input_path=INPUT,
        output_path=OUTPUT,
        max_new_tokens=int(os.environ.get("HFLLM_MAX_NEW_TOKENS", "64")),
        chunk_rows=CHUNK_ROWS,
        queue=os.environ.get("HFLLM_GPU_QUEUE", "default"),  # "gpu" on a Celery deployment
        pool=os.environ.get("HFLLM_GPU_POOL", "default_pool"),  # slots = GPUs
        max_active_tis_per_dagrun=int(os.environ.get("HFLLM_MAX_PARALLEL", "4")),
        retries=2,
        map_index_template="shard {{ task.shard['index'] }}",
    ).expand_kwargs(plan.output)
    merge = HFMergeShardsOperator(task_id="merge", output_path=OUTPUT)
    generate >> merge
