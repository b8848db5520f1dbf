"""Vision-language generation (Qwen2.5-VL and alike): model and processor through the shared model
cache, and batched ``generate()`` over rows of images and prompts.

The model is an ordinary :class:`~airflow_hfllm.engine.spec.ModelSpec` with ``task="vision"``
(``AutoModelForImageTextToText``), so it is cached and evicted like every other model. The processor
is cached next to it, keyed by the model alone: its options (``min_pixels``/``max_pixels``) are not part
of the model's identity, they are passed on every call (and are part of the job fingerprint).

``AutoProcessor`` needs the video processor, which needs torchvision; without it (CPU here) it raises,
or in some versions silently returns only the tokenizer. Both are detected, and the processor is then
built from its parts (image processor + tokenizer), which is all image rows need.

:class:`VisionGenerator` reuses :class:`~airflow_hfllm.engine.generate.BatchedGenerator`'s batching
(longest first, token budget including image tokens, OOM -> split and retry, per-row EOS and stop
strings): rows are padded on the left by the processor, images of a batch are decoded and resized in
worker threads while the previous batch generates, and a row whose image fails to decode becomes an
``error`` row without touching the others.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

from airflow_hfllm.engine.cache import MODEL_CACHE, ModelCache
from airflow_hfllm.engine.fast import FastEngine
from airflow_hfllm.engine.generate import BatchedGenerator, Cancelled, Completion, Request, generate_kwargs
from airflow_hfllm.engine.loading import HubOptions, LoadedModel, get_model, prepare_tokenizer
from airflow_hfllm.engine.spec import GenerationParams, ModelSpec
from airflow_hfllm.io.images import ImageError, ImageLoader, ProbedImage

log = logging.getLogger(__name__)

VISION_TASK = "vision"


def vision_spec(spec: ModelSpec) -> ModelSpec:
    """``spec`` with ``task="vision"``."""
    return spec if spec.task == VISION_TASK else dataclasses.replace(spec, task=VISION_TASK)


# -- processor -------------------------------------------------------------------------------------
@dataclass
class LoadedProcessor:
    processor: Any
    how: str  # "AutoProcessor" or "built from image processor + tokenizer (...why...)"

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def image_processor(self):
        return self.processor.image_processor

    @property
    def factor(self) -> int:
        """Side of one language-model image token in pixels: patch size x merge size (28 for Qwen2.5-VL)."""
        ip = self.image_processor
        patch = getattr(ip, "patch_size", None) or 14
        merge = getattr(ip, "merge_size", None) or 2
        return int(patch) * int(merge)

    @property
    def image_token_id(self) -> int:
        token_id = getattr(self.processor, "image_token_id", None)
        if token_id is None:
            token_id = self.tokenizer.convert_tokens_to_ids(getattr(self.processor, "image_token", "<|image_pad|>"))
        return int(token_id)


def _has_image_processor(processor) -> bool:
    return getattr(processor, "image_processor", None) is not None and getattr(processor, "tokenizer", None) is not None


def load_processor(spec: ModelSpec, hub: HubOptions | None = None) -> LoadedProcessor:
    """``AutoProcessor`` for ``spec``, or, where that cannot give an image processor, the processor
    class built from its image processor and tokenizer. Fails with the reason when neither works."""
    import transformers

    hub = hub or HubOptions.from_env()
    common = dict(revision=spec.revision, trust_remote_code=spec.trust_remote_code, **hub.kwargs())
    try:
        processor = transformers.AutoProcessor.from_pretrained(spec.model, **common)
    except Exception as exc:  # ImportError for the video processor without torchvision, and others
        why = f"AutoProcessor failed: {type(exc).__name__}: {str(exc).strip().split('. ')[0][:200]}"
    else:
        if _has_image_processor(processor):
            loaded = LoadedProcessor(processor, "AutoProcessor")
            _left_padding(loaded)
            return loaded
        why = f"AutoProcessor returned a {type(processor).__name__} without an image processor"
    log.warning("processor for %s: %s; building it from the image processor and the tokenizer", spec.model, why)
    try:
        processor = _processor_from_parts(spec, common)
    except Exception as exc:
        raise RuntimeError(f"cannot build an image processor for {spec.model}: {why}; from its parts: "
                           f"{type(exc).__name__}: {exc}") from exc
    loaded = LoadedProcessor(processor, f"built from image processor + tokenizer ({why})")
    _left_padding(loaded)
    return loaded


def _processor_from_parts(spec: ModelSpec, common: dict):
    """The model's processor class with only its image processor and tokenizer (no video processor).

    ``ProcessorMixin`` derives the sub-processors it requires from ``__init__``'s parameters, so a
    subclass whose ``__init__`` names only ``image_processor`` and ``tokenizer`` keeps every image and
    text method (image-token expansion, ``mm_token_type_ids``) without asking for a video processor.
    """
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    config = transformers.AutoConfig.from_pretrained(spec.model, **common)
    name = PROCESSOR_MAPPING_NAMES.get(config.model_type)
    if not name:
        raise ValueError(f"no processor class is known for model type {config.model_type!r}")
    image_processor = transformers.AutoImageProcessor.from_pretrained(spec.model, **common)
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec.model, **common)
    return images_only_processor(getattr(transformers, name), image_processor, tokenizer,
                                 getattr(tokenizer, "chat_template", None))


def images_only_processor(processor_class, image_processor, tokenizer, chat_template=None):
    """An instance of (a subclass of) ``processor_class`` holding only an image processor and a tokenizer."""

    class ImagesOnly(processor_class):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
                             **kwargs)

    ImagesOnly.__name__ = ImagesOnly.__qualname__ = f"{processor_class.__name__}ImagesOnly"
    return ImagesOnly(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


def _left_padding(processor: LoadedProcessor) -> None:
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token_id = tokenizer.eos_token_id


def get_processor(spec: ModelSpec, hub: HubOptions | None = None, cache: ModelCache = MODEL_CACHE
                  ) -> LoadedProcessor:
    """The processor of ``spec``'s model from the process cache (keyed by model, revision and
    trust_remote_code only: processor options are passed per call)."""
    key = ("processor", spec.model, spec.revision, spec.trust_remote_code)
    return cache.get(key, lambda: load_processor(spec, hub))


def get_vision_model(spec: ModelSpec, hub: HubOptions | None = None, cache: ModelCache = MODEL_CACHE
                     ) -> LoadedModel:
    """``spec``'s model (task ``vision``) from the shared model cache, ready for left-padded batches."""
    loaded = get_model(vision_spec(spec), hub, cache)
    prepare_tokenizer(loaded.tokenizer, loaded.model)
    return loaded


# -- requests --------------------------------------------------------------------------------------
@dataclass
class VisionRequest(Request):
    """A row ready to generate: ``input_ids`` are the prompt's ids with each image placeholder expanded
    to its image's tokens (what the processor will produce: its length drives batching and the
    too-long check); ``text`` and ``images`` are what the processor gets; ``text_ids`` are the ids of
    ``text``, one placeholder per image (the fast engine expands them by the processor's grids)."""

    text: str = ""
    images: list[ProbedImage] = field(default_factory=list)
    text_ids: list[int] = field(default_factory=list)


def expand_placeholders(ids: list[int], token: int, counts: Sequence[int]) -> list[int]:
    """``ids`` with the k-th ``token`` repeated ``counts[k]`` times; ValueError when the numbers differ."""
    positions = [n for n, t in enumerate(ids) if t == token]
    if len(positions) != len(counts):
        raise ValueError(f"the prompt has {len(positions)} image placeholders for {len(counts)} images")
    expanded: list[int] = []
    start = 0
    for position, count in zip(positions, counts):
        expanded += ids[start:position] + [token] * count
        start = position + 1
    return expanded + ids[start:]


def decode_images(loader: ImageLoader, images: Sequence[ProbedImage]) -> list | str:
    """The row's decoded, resized images, or the error message of the first that fails."""
    out = []
    for k, probed in enumerate(images):
        try:
            out.append(loader.load(probed))
        except ImageError as exc:
            return f"image {k + 1} of {len(images)}: {exc}" if len(images) > 1 else str(exc)
    return out


def chat_text(processor: LoadedProcessor, messages: list[dict[str, Any]], n_images: int) -> str:
    """The formatted prompt: the user turn holds ``n_images`` image placeholders, then the text."""
    first_user = next((n for n, m in enumerate(messages) if m["role"] == "user"), None)
    if first_user is None:
        raise ValueError("a vision prompt needs a user message")
    chat = [{"role": m["role"], "content": m["content"]} for m in messages]
    chat[first_user]["content"] = [{"type": "image"} for _ in range(n_images)] + [
        {"type": "text", "text": messages[first_user]["content"]}]
    owner = processor.processor if getattr(processor.processor, "chat_template", None) else processor.tokenizer
    if getattr(owner, "chat_template", None):
        text = owner.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        if isinstance(text, list):
            text = text[0]
        return text
    # No chat template: the vision placeholders then the text, roles as plain prefixes.
    image = "<|vision_start|>" + getattr(processor.processor, "image_token", "<|image_pad|>") + "<|vision_end|>"
    parts = [f"{m['role']}: {m['content']}" if m["role"] != "user" else image * n_images + m["content"]
             for m in messages]
    return "\n\n".join(parts)


def build_request(processor: LoadedProcessor, messages: list[dict[str, Any]], images: Sequence[ProbedImage],
                  max_new_tokens: int) -> VisionRequest:
    text = chat_text(processor, messages, len(images))
    ids = list(processor.tokenizer(text)["input_ids"])
    expanded = expand_placeholders(ids, processor.image_token_id, [image.tokens for image in images])
    return VisionRequest(expanded, max_new_tokens, text=text, images=list(images), text_ids=ids)


# -- generation ------------------------------------------------------------------------------------
class VisionGenerator(BatchedGenerator):
    """Batched generation over :class:`VisionRequest` rows.

    :param processor: the model's processor (image processor + tokenizer).
    :param images: decodes and resizes the rows' images (the job's :class:`ImageLoader`).
    :param decode_workers: threads decoding the next batch's images while this one generates.
    """

    def __init__(self, loaded: LoadedModel, params: GenerationParams, processor: LoadedProcessor,
                 images: ImageLoader, *, decode_workers: int | None = None, **kwargs):
        super().__init__(loaded, params, **kwargs)
        self.processor = processor
        self.images = images
        self.decode_workers = decode_workers or max(1, min(8, (os.cpu_count() or 2) - 1))
        self._decoded: dict[int, list | str] = {}
        self._warned_count = False

    def generate(self, requests: Sequence[Request], seed: int | None = None, keys: Sequence | None = None
                 ) -> list[Completion]:
        """Completions in order; sampling seeded once per call, as :class:`BatchedGenerator`."""
        import torch

        if seed is not None:
            torch.manual_seed(seed)
        batches = self.batches(requests)
        results: dict[int, Completion] = {}
        with ThreadPoolExecutor(self.decode_workers, thread_name_prefix="hfllm-images") as pool:
            pending = self._decode_async(pool, batches[0], requests) if batches else {}
            try:
                for k, batch in enumerate(batches):
                    if self.should_stop():
                        raise Cancelled("stopped between batches")
                    current = pending
                    pending = self._decode_async(pool, batches[k + 1], requests) if k + 1 < len(batches) else {}
                    self._decoded = {i: future.result() for i, future in current.items()}
                    done = self._run(batch, requests)
                    self._decoded = {}
                    results.update(done)
                    self.on_batch(len(batch), sum(c.output_tokens for c in done.values()))
            finally:
                for future in pending.values():
                    future.cancel()
        return [results[i] for i in range(len(requests))]

    def _decode_async(self, pool: ThreadPoolExecutor, batch: list[int], requests) -> dict[int, Future]:
        return {i: pool.submit(self._decode_row, requests[i]) for i in batch}

    def _decode_row(self, request: VisionRequest) -> list | str:
        return decode_images(self.images, request.images)

    def _generate(self, batch: list[int], requests: Sequence[Request]) -> dict[int, Completion]:
        import torch

        failed = {i: Completion(None, 0, "error", self._decoded[i]) for i in batch if isinstance(self._decoded[i], str)}
        rows = [i for i in batch if i not in failed]
        if not rows:
            return failed
        try:
            inputs = self._inputs(rows, requests)
        except Exception as exc:  # one row's images the processor cannot take: find it, keep the others
            if len(rows) == 1:
                message = f"image processor failed ({type(exc).__name__}: {str(exc)[:200]})"
                return failed | {rows[0]: Completion(None, 0, "error", message)}
            log.warning("the processor failed on a batch of %d rows (%s); running them one by one",
                        len(rows), type(exc).__name__)
            for i in rows:
                failed |= self._generate([i], requests)
            return failed
        self._check_counts(inputs["attention_mask"].sum(dim=1).tolist(), [len(requests[i].input_ids) for i in rows])
        width = inputs["input_ids"].shape[1]
        model = self.loaded.model
        device = model.device if hasattr(model, "device") else self.loaded.device
        kwargs = generate_kwargs(self.params, self.pad, self.eos, self.loaded.tokenizer,
                                 max(requests[i].max_new_tokens for i in rows))
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            out = model.generate(**inputs.to(device), **kwargs)
        generated = out[:, width:].tolist()
        done = {i: self._completion(ids, requests[i].max_new_tokens) for i, ids in zip(rows, generated)}
        return done | failed

    def _inputs(self, rows: list[int], requests: Sequence[Request]):
        return self.processor.processor(
            text=[requests[i].text for i in rows],
            images=[image for i in rows for image in self._decoded[i]],
            padding=True,
            return_tensors="pt",
            size={"shortest_edge": self.images.min_pixels, "longest_edge": self.images.max_pixels},
        )

    def _check_counts(self, got: list[int], expected: list[int]) -> None:
        if got != expected and not self._warned_count:
            self._warned_count = True
            log.warning("the processor produced other prompt lengths than counted for batching (%s vs %s); "
                        "prompt_tokens may be off", got[:4], expected[:4])


# -- the fast engine over images -------------------------------------------------------------------
@dataclass
class _Pixels:
    """A row ready to prefill: its ids (each image placeholder expanded to its image's tokens) and its
    images as the vision tower takes them (flattened patches, grid per image)."""

    ids: list[int]
    pixel_values: Any
    grid: Any


class VisionFastEngine(FastEngine):
    """The fast engine (:mod:`airflow_hfllm.engine.fast`) for Qwen2-VL / Qwen2.5-VL rows.

    A prefill group runs the vision tower once over all its images (attention packed by
    :func:`~airflow_hfllm.engine.vision_attention.pack_vision_attention`), scatters the image
    embeddings into the prompt embeddings and runs the decoder with the model's own multimodal rope
    positions (``get_rope_index``). Decoding then needs no images: text positions after the prompt are
    equal on the three rope axes, which is plain rope at ``KV index + offset``, the offset being how
    many positions the images saved. Images are decoded, resized and patched in threads ahead of their
    admission; a row whose image fails ends with an ``error`` without taking a slot.

    :param prefetch: rows whose images are prepared ahead of admission (bounds host memory).
    """

    vision = True

    def __init__(self, loaded: LoadedModel, params: GenerationParams, processor: LoadedProcessor,
                 images: ImageLoader, *, decode_workers: int | None = None, prefetch: int = 256, **kwargs):
        super().__init__(loaded, params, **kwargs)
        from airflow_hfllm.engine.vision_attention import pack_vision_attention

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

    def _enqueue(self, item) -> None:
        self._queued.append(item[1])
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

    def _row_ready(self, item, window: list) -> bool:
        """Wait for the row's images (only rows about to be prefilled are waited for, so the GPU prefills
        one group while worker threads prepare the next); a row whose images failed leaves ``window``
        with an error."""
        tag, request, _ = item
        if id(request) in self._ready:
            return True
        future = self._futures.pop(id(request), None)
        if future is None:  # beyond the prefetch window: prepare it now, in a worker all the same
            self._queued.remove(request)
            future = self._pool.submit(self._pixels, request)
        started = time.monotonic()
        got = future.result()
        self.image_wait_seconds += time.monotonic() - started
        self._submit()
        if isinstance(got, str):
            window.remove(item)
            self._early.append((tag, Completion(None, 0, "error", got)))
            return False
        request.input_ids = got.ids  # the exact length, for slot sizing and longest-first order
        self._ready[id(request)] = got
        return True

    def stats(self) -> dict:
        return {**super().stats(), "image_wait_seconds": round(self.image_wait_seconds, 3),
                "packed_attention_modules": self.packed_attention_modules}

    def _inputs(self, group: list[Request]):
        import torch

        dev = self.device
        rows = [self._ready.pop(id(r)) for r in group]
        ids = self._padded_ids(group)  # the requests' ids are the rows' exact ones since _row_ready
        lengths = torch.tensor([len(r.input_ids) for r in group], device=dev)
        mask = torch.arange(ids.shape[1], device=dev)[None, :] < lengths[:, None]
        pixel_values = torch.cat([r.pixel_values for r in rows]).to(dev, non_blocking=True)
        grid = torch.cat([r.grid for r in rows]).to(dev)
        x = self.base.embed_tokens(ids)
        features = self._image_features(pixel_values, grid)
        features = getattr(features, "pooler_output", features)
        if isinstance(features, (list, tuple)):
            features = torch.cat(list(features))
        image = ids == self.image_token
        x[image] = features.to(x.dtype)
        kwargs = dict(image_grid_thw=grid, attention_mask=mask.long())
        if self._rope_takes_types:
            kwargs["mm_token_type_ids"] = image.int()
        positions, _ = self._rope_index(ids, **kwargs)
        # The next text position after each prompt, as an offset from its KV index.
        last = positions.masked_fill(~mask[None], -1).amax(dim=(0, 2))
        return ids, x, positions, last + 1 - lengths
