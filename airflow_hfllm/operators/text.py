"""HFTextGenerateOperator: generate text for a Parquet batch of prompts with a HuggingFace model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from airflow_hfllm.operators.base import HFGenerateBaseOperator, fs_and_path

if TYPE_CHECKING:
    from airflow.sdk import Context

__all__ = ["HFTextGenerateOperator", "fs_and_path"]


class HFTextGenerateOperator(HFGenerateBaseOperator):
    """
    Generate text for every row of a Parquet input with a HuggingFace causal LM, in GPU batches, with
    safety checks on prompts and outputs, writing Parquet parts and a ``_manifest.json`` to
    ``output_path``. Retries skip the parts already written; the manifest is the XCom return value.
    The shared parameters (paths, model, generation, safety, ...) are those of
    :class:`~airflow_hfllm.operators.base.HFGenerateBaseOperator`.

    :param peft_model: PEFT adapter (hub id or folder) loaded over ``base_model``. Templated.
    :param merge_adapter: merge the PEFT adapter into the weights (not when quantized).
    :param double_quant: 4-bit only: also quantize the quantization constants (on by default).
    :param messages_column: chat messages column (list of ``{role, content}``), instead of prompts.
    """

    template_fields: Sequence[str] = (*HFGenerateBaseOperator.template_fields, "peft_model")
    ui_color = "#ffd21e"

    def __init__(self, *, peft_model: str | None = None, merge_adapter: bool = True, double_quant: bool = True,
                 messages_column: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.peft_model = peft_model
        self.merge_adapter = merge_adapter
        self.double_quant = double_quant
        self.messages_column = messages_column

    def build_job(self, context: Context):
        from airflow_hfllm.config import ModelSpec
        from airflow_hfllm.jobs import TextJob

        return TextJob(
            model=ModelSpec(self.base_model, revision=self.revision or None, dtype=self.dtype,
                            quantization=self.quantization, double_quant=self.double_quant,
                            adapter=self.peft_model or None, merge_adapter=self.merge_adapter,
                            trust_remote_code=self.trust_remote_code),
            messages_column=self.messages_column,
            **self.job_arguments(context),
        )
