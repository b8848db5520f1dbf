from airflow_hfllm.operators.text import HFTextGenerateOperator
from airflow_hfllm.operators.vision import HFVisionGenerateOperator

__all__ = ["HFTextGenerateOperator", "HFVisionGenerateOperator"]
