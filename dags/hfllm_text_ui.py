"""Text generation made for the Airflow UI: "Trigger DAG" shows a form built from these Params."""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import DAG, Param

from airflow_hfllm.operators.text import HFTextGenerateOperator

DEMO = os.environ.get("HFLLM_DEMO_DIR", "/tmp/hfllm-demo")

with DAG(
    dag_id="hfllm_text_ui",
    schedule=None,
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    tags=["hfllm", "example"],
    render_template_as_native_obj=True,  # numbers, booleans and lists reach the operator as such
    params={
        "model": Param(os.environ.get("HFLLM_MODEL", f"{DEMO}/models/tiny-chat"), type="string",
                       title="Model", description="HuggingFace hub id (e.g. Qwen/Qwen2.5-7B-Instruct) or a folder"),
        "input": Param(os.environ.get("HFLLM_INPUT", f"{DEMO}/input"), type="string", title="Input",
                       description="Parquet file, folder or glob with id and prompt columns; s3://conn@bucket/... works"),
        "output": Param(os.environ.get("HFLLM_OUTPUT", f"{DEMO}/output-ui"), type="string", title="Output",
                        description="Output folder; each run writes run=<run id>/ under it"),
        "max_new_tokens": Param(64, type="integer", minimum=1, maximum=8192, title="Max new tokens",
                                description="Tokens to generate per row"),
        "temperature": Param(0.7, type="number", minimum=0.01, maximum=2.0, title="Temperature",
                             description="Sampling temperature (higher: more varied)"),
        "safety": Param(False, type="boolean", title="Safety checks",
                        description="Check prompts and outputs with the checker below"),
        "safety_checker": Param(os.environ.get("HFLLM_SAFETY_CHECKER", "salesforce:Salesforce/safety-flan-t5-base"),
                                type="string", title="Safety checker",
                                description="KIND:MODEL: salesforce, classifier, llama-guard or blocklist:FILE"),
    },
) as dag:
    HFTextGenerateOperator(
        task_id="generate",
        base_model="{{ params.model }}",
        input_path="{{ params.input }}",
        output_path="{{ params.output }}/run={{ run_id | replace(':', '-') | replace('+', '-') }}",
        max_new_tokens="{{ params.max_new_tokens }}",
        temperature="{{ params.temperature }}",
        safety_checkers="{{ [params.safety_checker] if params.safety else [] }}",
        seed=1234,
        queue=os.environ.get("HFLLM_GPU_QUEUE", "default"),  # "gpu" on a Celery deployment
        pool=os.environ.get("HFLLM_GPU_POOL", "default_pool"),  # slots = GPUs
    )
