"""Daily text generation over a ``ds`` partition: backfill-ready, retry-safe.

Each run reads the ``input`` param (a ``{ds}`` in it becomes the run's date, for daily prompt
partitions) and writes ``<output>/ds=YYYY-MM-DD/``; a retry or a backfill of the same date skips the
parts already written. Defaults come from the environment so ``make demo`` can point the DAG at a tiny
offline model; on a real deployment set the params to a hub id and object-store paths such as
``s3://aws_default@bucket/prompts/ds={ds}/`` (a param is not rendered again, so ``{{ ds }}`` in it
would stay literal: hence the ``{ds}`` placeholder).
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import DAG, Asset, Param

from airflow_hfllm.operators.text import HFTextGenerateOperator

DEMO = os.environ.get("HFLLM_DEMO_DIR", "/tmp/hfllm-demo")
# Downstream DAGs can be scheduled on this asset; each event's extra names the partition written.
OUTPUT_ASSET = Asset(name="hfllm_text_daily_output", uri="file://" + os.path.abspath(
    os.environ.get("HFLLM_OUTPUT", f"{DEMO}/output")))

with DAG(
    dag_id="hfllm_text_daily",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["hfllm", "example"],
    params={
        "model": Param(os.environ.get("HFLLM_MODEL", f"{DEMO}/models/tiny-chat"), type="string",
                       description="hub id or local folder of the causal LM"),
        "input": Param(os.environ.get("HFLLM_INPUT", f"{DEMO}/input"), type="string",
                       description="Parquet file, folder or glob of prompts (id, prompt); {ds} becomes the date"),
        "output": Param(os.environ.get("HFLLM_OUTPUT", f"{DEMO}/output"), type="string",
                        description="output root; each run writes ds=<date>/ under it"),
    },
) as dag:
    HFTextGenerateOperator(
        task_id="generate",
        base_model="{{ params.model }}",
        input_path="{{ params.input | replace('{ds}', ds) }}",
        output_path="{{ params.output }}/ds={{ ds }}",
        system_prompt="You are a concise assistant.",
        safety_checkers=[c for c in os.environ.get("HFLLM_SAFETY", "").split(",") if c],
        max_new_tokens=int(os.environ.get("HFLLM_MAX_NEW_TOKENS", "64")),
        do_sample=True,
        temperature=0.7,
        seed=1234,  # fixed: a backfill regenerates a partition identically
        output_asset=OUTPUT_ASSET,
        chunk_rows=int(os.environ.get("HFLLM_CHUNK_ROWS", "1000")),
        max_error_rate=float(os.environ.get("HFLLM_MAX_ERROR_RATE", "0.05")),
        queue=os.environ.get("HFLLM_GPU_QUEUE", "default"),  # "gpu" on a Celery deployment
        pool=os.environ.get("HFLLM_GPU_POOL", "default_pool"),  # slots = GPUs
        retries=2,
    )
