"""The vision kind of job: an image manifest in, one generation per row (Qwen2-VL / Qwen2.5-VL / Qwen3-VL)."""

from __future__ import annotations

from typing import Any

from airflow_hfllm.config import GenerationParams, JobConfig, ModelSpec, VisionOptions
from airflow_hfllm.engine.generate import Request
from airflow_hfllm.engine.prompts import RowError
from airflow_hfllm.io.dataset import Dataset, InputError
from airflow_hfllm.run.job import Job, default_params, split_arguments
from airflow_hfllm.vision.images import ImageLoader
from airflow_hfllm.vision.processor import get_processor, get_vision_model, vision_spec
from airflow_hfllm.vision.requests import build_request
from airflow_hfllm.vision.sources import ImageError, image_column_error, parse_cell


class VisionKind:
    """Rows of a prompt and one or more images (``options.image_column``), generated with a
    vision-language model. A row whose image is missing, unreadable, not an image, over PIL's
    decompression-bomb limit, or behind a refused URL scheme gets an ``error``; the other rows are
    unharmed. The manifest's files are fingerprinted, the image files they point at are not: rewrite an
    image in place and the job will not notice.

    :param image_fs: fsspec filesystem for image URIs of its protocol (the operator passes the
        manifest's object store, with the connection's credentials); other object-store URIs use
        fsspec's default credentials.
    """

    name = "vision"
    vision = True

    def __init__(self, options: VisionOptions, image_fs: Any = None):
        self.options, self.image_fs = options, image_fs
        self.images = self._loader()
        self.processor = None

    def _loader(self, **factor) -> ImageLoader:
        o = self.options
        return ImageLoader(o.min_pixels, o.max_pixels, allow_http=o.allow_http_images, fs=self.image_fs,
                           max_bytes=o.max_image_bytes, backend=o.image_backend, **factor)

    def spec(self, model: ModelSpec) -> ModelSpec:
        return vision_spec(model)

    def columns(self) -> list[str]:
        return [self.options.image_column]

    def check_input(self, dataset: Dataset) -> None:
        problem = image_column_error(dataset.schema.field(self.options.image_column).type)
        if problem:
            raise InputError(f"{dataset.files[0].path}: column {self.options.image_column!r} {problem}")

    def load(self, model: ModelSpec, hub, log):
        loaded = get_vision_model(model, hub)
        self.processor = get_processor(model, hub)
        factor = self.processor.factor
        if factor != self.images.factor:
            self.images = self._loader(factor=factor)
        log.info("vision: processor %s, %s", type(self.processor.processor).__name__, self.processor.how)
        log.info("vision: images resized with %s to %d..%d pixels, sides multiples of %d; http(s) images %s",
                 self.images.describe(), self.options.min_pixels, self.options.max_pixels, factor,
                 "allowed" if self.options.allow_http_images else "refused")
        return loaded

    def prepare(self, values: dict) -> list:
        try:
            sources = parse_cell(values.get(self.options.image_column))
            for source in sources:
                self.images.check(source)
        except ImageError as exc:
            raise RowError(str(exc)) from None
        return sources

    def requests(self, rows: list[tuple[list, list, int]], loaded) -> list[Request | RowError]:
        made = []
        for messages, sources, max_new_tokens in rows:
            try:
                made.append(self.request(messages, sources, max_new_tokens))
            except RowError as exc:
                made.append(exc)
        return made

    def request(self, messages: list, sources: list, max_new_tokens: int) -> Request:
        probed = []
        for k, source in enumerate(sources):
            try:
                probed.append(self.images.probe(source))
            except ImageError as exc:
                raise RowError(f"image {k + 1} of {len(sources)}: {exc}" if len(sources) > 1 else str(exc)) from None
        return build_request(self.processor, messages, probed, max_new_tokens)

    def engines(self, loaded, params: GenerationParams, config: JobConfig, **common):
        from airflow_hfllm.vision.fast import VisionFastEngine
        from airflow_hfllm.vision.generator import VisionGenerator

        return (VisionFastEngine, dict(processor=self.processor, images=self.images)), lambda: VisionGenerator(
            loaded, params, self.processor, self.images, max_batch_size=config.batch_size,
            token_budget=config.token_budget, **common)

    def fingerprint(self) -> dict:
        return {"image_column": self.options.image_column, **self.images.fingerprint()}

    def manifest(self) -> dict:
        return {**self.images.fingerprint(), "image_backend": self.images.backend,
                "processor": None if self.processor is None else self.processor.how}


class VisionJob(Job):
    """Generate text for every row of an image manifest with a vision-language model (Qwen2.5-VL).

    The manifest has ``id``, ``prompt`` (or a ``prompt_template``) and ``image``: a path or URI (local,
    ``file://``, an object store through fsspec, ``data:image/...;base64,``), image bytes (a binary
    column), or a list of those for several images in one row. Takes :class:`~airflow_hfllm.run.job.Job`'s
    arguments with the fields of :class:`~airflow_hfllm.config.JobConfig` and
    :class:`~airflow_hfllm.config.VisionOptions` flat, plus ``image_fs`` (see :class:`VisionKind`);
    ``params`` defaults to greedy decoding, as the spec's image model did.
    """

    def __init__(self, *, image_fs: Any = None, **arguments):
        config, options, rest = split_arguments("vision", arguments, VisionOptions)
        rest.setdefault("params", default_params("vision"))
        super().__init__(VisionKind(options, image_fs), config=config, **rest)
