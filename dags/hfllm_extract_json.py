"""Nightly structured extraction: each review becomes a JSON object that follows a schema, checked for
safety on the way in and out.

The model can only write what the schema allows (``json_schema``: decoding is constrained token by token
through llguidance, see docs/design.md, "Constrained outputs"), so the next task reads ``output`` with
``json.loads`` instead of parsing free text: a row whose output was cut by ``max_new_tokens`` before the
object closed ends with ``finish_reason="length"`` and an ``error``, never as valid JSON. Every run
writes ``<output>/ds=YYYY-MM-DD/``; a retry or a backfill skips the parts already written. Defaults come
from the environment so the DAG runs on the tiny offline model of ``make demo``.
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import DAG, Param

from airflow_hfllm.operators.text import HFTextGenerateOperator

DEMO = os.environ.get("HFLLM_DEMO_DIR", "/tmp/hfllm-demo")

# Bounded strings and arrays: an unbounded field lets a weak model run on to max_new_tokens.
REVIEW = {
    "type": "object",
    "properties": {
        "product": {"type": "string", "maxLength": 40},
        "sentiment": {"enum": ["positive", "neutral", "negative"]},
        "defects": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 3},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["product", "sentiment", "defects", "rating"],
    "additionalProperties": False,
}

with DAG(
    dag_id="hfllm_extract_json",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["hfllm", "example"],
    params={
        "model": Param(os.environ.get("HFLLM_MODEL", f"{DEMO}/models/tiny-chat"), type="string",
                       description="hub id or local folder of the causal LM"),
        "input": Param(os.environ.get("HFLLM_INPUT", f"{DEMO}/reviews"), type="string",
                       description="Parquet of reviews (id, prompt); {ds} becomes the date"),
        "output": Param(os.environ.get("HFLLM_OUTPUT", f"{DEMO}/extracted"), type="string",
                        description="output root; each run writes ds=<date>/ under it"),
    },
) as dag:
    HFTextGenerateOperator(
        task_id="extract",
        base_model="{{ params.model }}",
        input_path="{{ params.input | replace('{ds}', ds) }}",
        output_path="{{ params.output }}/ds={{ ds }}",
        system_prompt="Extract the product, the sentiment, up to three defects and a 1-5 rating from the "
                      "review, as JSON.",
        json_schema=REVIEW,
        safety_checkers=[c for c in os.environ.get("HFLLM_SAFETY", "").split(",") if c],
        max_new_tokens=int(os.environ.get("HFLLM_MAX_NEW_TOKENS", "256")),
        do_sample=False,
        chunk_rows=int(os.environ.get("HFLLM_CHUNK_ROWS", "1000")),
        max_error_rate=float(os.environ.get("HFLLM_MAX_ERROR_RATE", "0.05")),
        queue=os.environ.get("HFLLM_GPU_QUEUE", "default"),
        pool=os.environ.get("HFLLM_GPU_POOL", "default_pool"),
        retries=2,
    )
