from airflow_hfllm.operators.shards import HFMergeShardsOperator, HFShardPlanOperator
from airflow_hfllm.operators.text import HFTextGenerateOperator
from airflow_hfllm.operators.vision import HFVisionGenerateOperator

__all__ = ["HFMergeShardsOperator", "HFShardPlanOperator", "HFTextGenerateOperator", "HFVisionGenerateOperator"]
