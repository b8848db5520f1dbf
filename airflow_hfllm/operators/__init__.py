from airflow_hfllm.operators.text import HFTextGenerateOperator

__all__ = ["HFTextGenerateOperator"]
