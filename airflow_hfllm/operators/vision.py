"""HFVisionGenerateOperator: generate text for a manifest of images and prompts with a HuggingFace
vision-language model (Qwen2.5-VL)."""

from __future__ import annotations

from airflow_hfllm.operators.base import HFGenerateBaseOperator, operator_signature


class HFVisionGenerateOperator(HFGenerateBaseOperator):
    """
    Generate text for every row of an image manifest (Parquet: ``id``, ``prompt``, ``image``) with a
    HuggingFace vision-language model, in GPU batches, with safety checks on prompt and output text,
    writing Parquet parts and a ``_manifest.json`` to ``output_path``. Retries skip the parts already
    written; the manifest is the XCom return value.

    ``image`` is a path or URI (local, ``file://``, object store, ``data:image/...;base64,``), image bytes
    (a binary column), or a list of those for several images per row. Object-store image URIs of the
    same protocol as ``input_path`` are read with its connection. A row whose image cannot be used gets
    an ``error`` and the others still run; the task fails (after writing) only when more than
    ``max_error_rate`` of the rows ended in error. The defaults differ from the text operator's in
    ``chunk_rows=256`` and ``do_sample=False`` (greedy, as the spec's image model). The arguments besides
    the job parameters are :class:`~airflow_hfllm.operators.base.HFGenerateBaseOperator`'s.
    """

    kind = "vision"
    ui_color = "#ffb84d"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)

    __init__.__signature__ = operator_signature("vision", HFGenerateBaseOperator.__init__)
