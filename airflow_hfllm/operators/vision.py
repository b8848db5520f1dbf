"""HFVisionGenerateOperator: generate text for a manifest of images and prompts with a HuggingFace
vision-language model (Qwen2.5-VL)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from airflow_hfllm.operators.base import HFGenerateBaseOperator
from airflow_hfllm.vision.defaults import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS  # imports nothing

if TYPE_CHECKING:
    from airflow.sdk import Context


class HFVisionGenerateOperator(HFGenerateBaseOperator):
    """
    Generate text for every row of an image manifest (Parquet: ``id``, ``prompt``, ``image``) with a
    HuggingFace vision-language model, in padded GPU batches, with safety checks on prompt and output
    text, writing Parquet parts and a ``_manifest.json`` to ``output_path``. Retries skip the parts
    already written; the manifest is the XCom return value.

    ``image`` is a path or URI (local, ``file://``, object store, ``data:image/...;base64,``), image bytes
    (a binary column), or a list of those for several images per row. Object-store image URIs of the
    same protocol as ``input_path`` are read with its connection. A row whose image cannot be used gets
    an ``error`` and the others still run; the task fails (after writing) only when more than
    ``max_error_rate`` of the rows ended in error.

    The shared parameters (paths, model, generation, safety, ...) are those of
    :class:`~airflow_hfllm.operators.base.HFGenerateBaseOperator`; the defaults differ in
    ``chunk_rows=256`` and ``do_sample=False`` (greedy, as the spec's image model).

    :param min_pixels: fewest pixels of a resized image (default ``224*28*28``). Templated.
    :param max_pixels: most pixels of a resized image (default ``1280*28*28``). Templated.
    :param allow_http_images: fetch ``http(s)://`` images; off by default (such rows get an error).
    :param max_image_bytes: largest encoded image accepted.
    :param image_column: image column (see above).
    """

    template_fields: Sequence[str] = (*HFGenerateBaseOperator.template_fields, "min_pixels", "max_pixels")
    ui_color = "#ffb84d"

    def __init__(self, *, min_pixels: int | str = DEFAULT_MIN_PIXELS, max_pixels: int | str = DEFAULT_MAX_PIXELS,
                 allow_http_images: bool = False, max_image_bytes: int = DEFAULT_MAX_BYTES, image_column: str = "image",
                 chunk_rows: int = 256, do_sample: bool = False, **kwargs):
        super().__init__(chunk_rows=chunk_rows, do_sample=do_sample, **kwargs)
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.allow_http_images = allow_http_images
        self.max_image_bytes = max_image_bytes
        self.image_column = image_column

    def build_job(self, context: Context):
        from airflow_hfllm.config import ModelSpec
        from airflow_hfllm.vision.job import VisionJob

        arguments = self.job_arguments(context)
        return VisionJob(
            model=ModelSpec(self.base_model, revision=self.revision or None, dtype=self.dtype,
                            quantization=self.quantization, trust_remote_code=self.trust_remote_code,
                            task="vision"),
            image_column=self.image_column,
            min_pixels=int(self.min_pixels),
            max_pixels=int(self.max_pixels),
            allow_http_images=self.allow_http_images,
            image_fs=arguments["input_fs"],  # image URIs on the manifest's object store use its connection
            max_image_bytes=self.max_image_bytes,
            **arguments,
        )
