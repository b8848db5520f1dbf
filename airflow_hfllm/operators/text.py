"""HFTextGenerateOperator: generate text for a Parquet batch of prompts with a HuggingFace model."""

from __future__ import annotations

from airflow_hfllm.operators.base import HFGenerateBaseOperator, fs_and_path, operator_signature

__all__ = ["HFTextGenerateOperator", "fs_and_path"]


class HFTextGenerateOperator(HFGenerateBaseOperator):
    """
    Generate text for every row of a Parquet input with a HuggingFace causal LM, in GPU batches, with
    safety checks on prompts and outputs, writing Parquet parts and a ``_manifest.json`` to
    ``output_path``. Retries skip the parts already written; the manifest is the XCom return value.
    The arguments besides the job parameters are
    :class:`~airflow_hfllm.operators.base.HFGenerateBaseOperator`'s.
    """

    kind = "text"
    ui_color = "#ffd21e"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)

    __init__.__signature__ = operator_signature("text", HFGenerateBaseOperator.__init__)
