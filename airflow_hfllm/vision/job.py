"""The vision kind of job: an image manifest in, one generation per row (Qwen2-VL / Qwen2.5-VL)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from airflow_hfllm.engine.generate import Request
from airflow_hfllm.engine.prompts import RowError, checked_text
from airflow_hfllm.config import GenerationParams
from airflow_hfllm.io.dataset import Dataset, InputError
from airflow_hfllm.jobs import Job, Progress
from airflow_hfllm.vision.defaults import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
from airflow_hfllm.vision.fast import VisionFastEngine
from airflow_hfllm.vision.generator import VisionGenerator
from airflow_hfllm.vision.images import ImageLoader
from airflow_hfllm.vision.processor import get_processor, get_vision_model, vision_spec
from airflow_hfllm.vision.requests import build_request
from airflow_hfllm.vision.sources import ImageError, image_column_error, parse_cell


@dataclass
class VisionJob(Job):
    """Generate text for every row of an image manifest with a vision-language model (Qwen2.5-VL).

    The manifest has ``id``, ``prompt`` (or a ``prompt_template``) and ``image``: a path or URI (local,
    ``file://``, an object store through fsspec, ``data:image/...;base64,``), image bytes (a binary
    column), or a list of those for several images in one row. Everything else (chunks, resume, safety
    checks of prompt and output text, parts, manifest, progress) is :class:`Job`'s. A row whose image
    is missing, unreadable, not an image, over PIL's decompression-bomb limit, or behind a refused URL
    scheme gets an ``error``; the other rows are unharmed. The manifest's files are fingerprinted, the
    image files they point at are not: rewrite an image in place and the job will not notice.

    :param image_column: the image column.
    :param min_pixels: fewest pixels of a resized image (the spec's ``224*28*28``).
    :param max_pixels: most pixels of a resized image (the spec's ``1280*28*28``).
    :param allow_http_images: fetch ``http(s)://`` images (off: such rows get an error).
    :param image_fs: fsspec filesystem for image URIs of its protocol (the operator passes the
        manifest's object store, with the connection's credentials); other object-store URIs use
        fsspec's default credentials.
    :param max_image_bytes: largest encoded image accepted.
    :param image_backend: ``auto`` (``qwen_vl_utils`` where it imports, else the PIL implementation of
        the same resize), ``qwen-vl-utils`` or ``pil``.
    :param engine: ``auto`` (the fast engine, :class:`~airflow_hfllm.vision.fast.VisionFastEngine`, on
        a GPU for Qwen2-VL / Qwen2.5-VL), ``fast`` or ``batched`` (padded batches of ``generate()``).

    ``params`` defaults to greedy decoding (``do_sample=False``), as the spec's image model did; the
    other parameters are :class:`TextJob`'s, except ``messages_column`` (not supported here).
    """

    params: GenerationParams = field(default_factory=lambda: GenerationParams(do_sample=False))
    chunk_rows: int = 256
    image_column: str = "image"
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    allow_http_images: bool = False
    image_fs: Any = None
    max_image_bytes: int = DEFAULT_MAX_BYTES
    image_backend: str = "auto"

    kind: ClassVar[str] = "vision"

    def __post_init__(self):
        super().__post_init__()
        if self.messages_column:
            raise ValueError("VisionJob takes prompt_column or prompt_template, not messages_column")
        self.model = vision_spec(self.model)
        self.images = self._image_loader()
        self.processor = None

    def _image_loader(self, **factor) -> ImageLoader:
        return ImageLoader(self.min_pixels, self.max_pixels, allow_http=self.allow_http_images, fs=self.image_fs,
                           max_bytes=self.max_image_bytes, backend=self.image_backend, **factor)

    def _required_columns(self) -> list[str]:
        return [*super()._required_columns(), self.image_column]

    def open_input(self) -> Dataset:
        dataset = super().open_input()
        problem = image_column_error(dataset.schema.field(self.image_column).type)
        if problem:
            raise InputError(f"{dataset.files[0].path}: column {self.image_column!r} {problem}")
        return dataset

    def _row_columns(self, dataset: Dataset) -> list[str]:
        return list(dict.fromkeys([*super()._row_columns(dataset), self.image_column]))

    def _load(self):
        loaded = get_vision_model(self.model, self.hub)
        self.processor = get_processor(self.model, self.hub)
        factor = self.processor.factor
        if factor != self.images.factor:
            self.images = self._image_loader(factor=factor)
        self.log.info("vision: processor %s, %s", type(self.processor.processor).__name__, self.processor.how)
        self.log.info("vision: images resized with %s to %d..%d pixels, sides multiples of %d; http(s) images %s",
                      self.images.describe(), self.min_pixels, self.max_pixels, factor,
                      "allowed" if self.allow_http_images else "refused")
        return loaded

    def _generator(self, loaded, progress: Progress):
        return self._fast_or(loaded, progress, VisionFastEngine, lambda: VisionGenerator(
            loaded, self.params, self.processor, self.images, max_batch_size=self.batch_size,
            token_budget=self.token_budget, should_stop=self.stop_event.is_set, on_batch=progress.batch),
            processor=self.processor, images=self.images)

    def _prepare(self, row: dict):
        messages = self.prompts.messages(row)
        try:
            sources = parse_cell(row.get(self.image_column))
            for source in sources:
                self.images.check(source)
        except ImageError as exc:
            raise RowError(str(exc)) from None
        return messages, sources

    def _checked_text(self, prepared) -> str:
        return checked_text(prepared[0])

    def _build_request(self, row: dict, prepared, loaded) -> Request:
        messages, sources = prepared
        probed = []
        for k, source in enumerate(sources):
            try:
                probed.append(self.images.probe(source))
            except ImageError as exc:
                raise RowError(f"image {k + 1} of {len(sources)}: {exc}" if len(sources) > 1 else str(exc)) from None
        return build_request(self.processor, messages, probed, self._max_new_tokens(row))

    def _fingerprint_extra(self) -> dict:
        return {"image_column": self.image_column, **self.images.fingerprint()}

    def _manifest_extra(self) -> dict:
        return {"vision": {
            **self.images.fingerprint(),
            "image_backend": self.images.backend,
            "processor": None if self.processor is None else self.processor.how,
        }}
