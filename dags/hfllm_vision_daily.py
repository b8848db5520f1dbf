"""Daily image captioning / visual QA over a ``ds`` partition of an image manifest: retry-safe.

Each run reads the manifest at ``{input}`` (Parquet: ``id``, ``prompt``, ``image``, where ``image`` is a
path/URI such as ``s3://bucket/img/1.jpg`` or ``data:image/png;base64,...``, or image bytes) and writes
``{output}/ds=YYYY-MM-DD/``; a retry or a backfill of the same date skips the parts already written.
Defaults come from the environment so a demo can point the DAG at a tiny offline model (build one with
``airflow_hfllm.testing.vision.make_tiny_vision_model``); on a real deployment set the params to e.g.
``Qwen/Qwen2.5-VL-3B-Instruct`` and object-store paths such as ``s3://aws_default@bucket/manifests/``.
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import DAG, Param

from airflow_hfllm.operators.vision import HFVisionGenerateOperator

DEMO = os.environ.get("HFLLM_DEMO_DIR", "/tmp/hfllm-demo")

with DAG(
    dag_id="hfllm_vision_daily",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["hfllm", "example", "vision"],
    params={
        "model": Param(os.environ.get("HFLLM_VISION_MODEL", f"{DEMO}/models/tiny-vl"), type="string",
                       description="hub id or local folder of the vision-language model"),
        "input": Param(os.environ.get("HFLLM_VISION_INPUT", f"{DEMO}/vision-input"), type="string",
                       description="Parquet manifest file, folder or glob (id, prompt, image)"),
        "output": Param(os.environ.get("HFLLM_VISION_OUTPUT", f"{DEMO}/vision-output"), type="string",
                        description="output root; each run writes ds=<date>/ under it"),
    },
) as dag:
    HFVisionGenerateOperator(
        task_id="describe",
        base_model="{{ params.model }}",
        input_path="{{ params.input }}",
        output_path="{{ params.output }}/ds={{ ds }}",
        system_prompt="You describe images factually and briefly.",
        min_pixels=int(os.environ.get("HFLLM_MIN_PIXELS", str(224 * 28 * 28))),
        max_pixels=int(os.environ.get("HFLLM_MAX_PIXELS", str(1280 * 28 * 28))),
        safety_checkers=[c for c in os.environ.get("HFLLM_SAFETY", "").split(",") if c],
        max_new_tokens=int(os.environ.get("HFLLM_MAX_NEW_TOKENS", "128")),
        do_sample=False,  # greedy: a backfill regenerates a partition identically
        chunk_rows=int(os.environ.get("HFLLM_CHUNK_ROWS", "256")),
        batch_size=int(os.environ["HFLLM_BATCH_SIZE"]) if os.environ.get("HFLLM_BATCH_SIZE") else None,
        max_error_rate=float(os.environ.get("HFLLM_MAX_ERROR_RATE", "0.05")),
        retries=2,
    )
