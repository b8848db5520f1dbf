"""The fast engine (:mod:`airflow_hfllm.engine.fast`) over images: :class:`VisionFastEngine`."""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from airflow_hfllm.engine.fast import FastEngine
from airflow_hfllm.engine.generate import Request
from airflow_hfllm.engine.loading import LoadedModel
from airflow_hfllm.engine.scheduler import Row
from airflow_hfllm.config import GenerationParams
from airflow_hfllm.vision.images import ImageLoader, decode_images
from airflow_hfllm.vision.processor import LoadedProcessor
from airflow_hfllm.vision.requests import VisionRequest, expand_placeholders


@dataclass
class _Pixels:
    """A row ready to prefill: its ids (each image placeholder expanded to its image's tokens) and its
    images as the vision tower takes them (flattened patches, grid per image)."""

    ids: list[int]
    pixel_values: Any
    grid: Any


class VisionFastEngine(FastEngine):
    """The fast engine (:mod:`airflow_hfllm.engine.fast`) for Qwen2-VL / Qwen2.5-VL / Qwen3-VL rows.

    A prefill group runs the vision tower once over all its images (attention packed by
    :func:`~airflow_hfllm.vision.attention.pack_vision_attention`), scatters the image
    embeddings into the prompt embeddings and runs the decoder with the model's own multimodal rope
    positions (``get_rope_index``); Qwen3-VL's deepstack features are added at the image tokens after its
    first decoder layers. Decoding then needs no images: text positions after the prompt are
    equal on the three rope axes, which is plain rope at ``KV index + offset``, the offset being how
    many positions the images saved. Images are decoded, resized and patched in threads ahead of their
    admission; a row whose image fails ends with an ``error`` without taking a slot.

    :param prefetch: rows whose images are prepared ahead of admission (bounds host memory).
    """

    vision = True

    def __init__(self, loaded: LoadedModel, params: GenerationParams, processor: LoadedProcessor,
                 images: ImageLoader, *, decode_workers: int | None = None, prefetch: int = 256, **kwargs):
        super().__init__(loaded, params, **kwargs)
        from airflow_hfllm.vision.attention import pack_vision_attention

        self.processor, self.images = processor, images
        self.decode_workers = decode_workers or max(1, min(8, (os.cpu_count() or 2) - 1))
        self.prefetch = prefetch
        self.packed_attention_modules = pack_vision_attention(self.model)
        self.image_token = int(getattr(self.model.config, "image_token_id", None) or processor.image_token_id)
        vision_cfg = getattr(self.model.config, "vision_config", None)
        self.merge = int(getattr(vision_cfg, "spatial_merge_size", 2))
        inner = self.model.model
        self._rope_index = getattr(inner, "get_rope_index", None) or self.model.get_rope_index
        self._image_features = getattr(inner, "get_image_features", None) or self.model.get_image_features
        import inspect

        self._rope_takes_types = "mm_token_type_ids" in inspect.signature(self._rope_index).parameters
        self._pool = None
        self._queued: list = []  # requests in arrival order whose images are not submitted yet
        self._futures: dict[int, Future] = {}
        self._ready: dict[int, _Pixels] = {}
        self.image_wait_seconds = 0.0  # the host waiting for worker threads' images

    def stream(self, items, seed=None, lookahead: int = 1024):
        with ThreadPoolExecutor(self.decode_workers, thread_name_prefix="hfllm-images") as pool:
            self._pool = pool
            try:
                yield from super().stream(items, seed, lookahead)
            finally:
                for future in self._futures.values():
                    future.cancel()
                self._pool, self._queued, self._futures, self._ready = None, [], {}, {}

    def _enqueue(self, row: Row) -> None:
        self._queued.append(row.request)
        self._submit()

    def _submit(self) -> None:
        if not self._queued or len(self._futures) + len(self._ready) >= self.prefetch:
            return
        self._queued.sort(key=lambda r: -len(r.input_ids))  # the order rows are admitted in
        while self._queued and len(self._futures) + len(self._ready) < self.prefetch:
            request = self._queued.pop(0)
            self._futures[id(request)] = self._pool.submit(self._pixels, request)

    def _pixels(self, request: VisionRequest) -> _Pixels | str:
        """Decode, resize and patch the row's images (in a worker thread); the error text on failure."""
        decoded = decode_images(self.images, request.images)
        if isinstance(decoded, str):
            return decoded
        try:
            # The processor's own resize too, as in the batched path and the spec: on an image already
            # at its target size it looks like the identity, but torchvision's resample is not exactly one.
            out = self.processor.image_processor(
                images=decoded, return_tensors="pt",
                size={"shortest_edge": self.images.min_pixels, "longest_edge": self.images.max_pixels})
        except Exception as exc:
            return f"image processor failed ({type(exc).__name__}: {str(exc)[:200]})"
        try:
            expanded = expand_placeholders(request.text_ids, self.image_token,
                                           (out["image_grid_thw"].prod(-1) // self.merge ** 2).tolist())
        except ValueError as exc:
            return str(exc)
        pixels = out["pixel_values"].to(self.dtype)
        if self.device.type == "cuda":  # pinned: the copy to the GPU is then asynchronous
            pixels = pixels.pin_memory()
        return _Pixels(expanded, pixels, out["image_grid_thw"])

    def _prepare(self, row: Row) -> str | None:
        """Wait for the row's images (only rows about to be prefilled are waited for, so the GPU prefills
        one group while worker threads prepare the next); their error if they failed."""
        request = row.request
        if id(request) in self._ready:
            return None
        future = self._futures.pop(id(request), None)
        if future is None:  # beyond the prefetch window: prepare it now, in a worker all the same
            self._queued.remove(request)
            future = self._pool.submit(self._pixels, request)
        started = time.monotonic()
        got = future.result()
        self.image_wait_seconds += time.monotonic() - started
        self._submit()
        if isinstance(got, str):
            return got
        request.input_ids = got.ids  # the exact length, for slot sizing and longest-first order
        self._ready[id(request)] = got
        return None

    def stats(self) -> dict:
        return {**super().stats(), "image_wait_seconds": round(self.image_wait_seconds, 3),
                "packed_attention_modules": self.packed_attention_modules}

    def _inputs(self, group: list[Request], skip: int = 0):  # no prefix reuse: skip is 0
        import torch

        dev = self.device
        rows = [self._ready.pop(id(r)) for r in group]
        ids = self._padded_ids(group)  # the requests' ids are the rows' exact ones since _row_ready
        lengths = torch.tensor([len(r.input_ids) for r in group], device=dev)
        mask = torch.arange(ids.shape[1], device=dev)[None, :] < lengths[:, None]
        pixel_values = torch.cat([r.pixel_values for r in rows]).to(dev, non_blocking=True)
        grid = torch.cat([r.grid for r in rows]).to(dev)
        x = self.base.embed_tokens(ids)
        embeds, deep = _features(self._image_features(pixel_values, grid))
        image = ids == self.image_token
        x[image] = embeds.to(x.dtype)
        # Qwen3-VL: features of early vision blocks, added to the image tokens' hidden states after the
        # first decoder layers; the rows' images in order, as the scatter above
        deepstack = (image, [f.to(x.dtype) for f in deep]) if deep else None
        kwargs = dict(image_grid_thw=grid, attention_mask=mask.long())
        if self._rope_takes_types:
            kwargs["mm_token_type_ids"] = image.int()
        positions, _ = self._rope_index(ids, **kwargs)
        # The next text position after each prompt, as an offset from its KV index.
        last = positions.masked_fill(~mask[None], -1).amax(dim=(0, 2))
        return ids, x, positions, last + 1 - lengths, deepstack


def _features(out):
    """(image embeddings [k, D], deepstack features: a list of [k, D], empty but for Qwen3-VL) of the vision
    tower's output: a model output (transformers 5.2x) or tuples (earlier: the embeddings split per image,
    for Qwen3-VL a pair of those and the deepstack list)."""
    import torch

    def joined(features):
        return torch.cat(list(features)) if isinstance(features, (list, tuple)) else features

    if hasattr(out, "pooler_output"):
        embeds, deep = out.pooler_output, getattr(out, "deepstack_features", None) or []
    elif isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], list):
        embeds, deep = out
    else:
        embeds, deep = out, []
    return joined(embeds), [joined(f) for f in deep]
