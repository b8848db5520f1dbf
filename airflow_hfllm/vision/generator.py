"""Batched ``generate()`` over vision rows.

:class:`VisionGenerator` reuses :class:`~airflow_hfllm.engine.generate.BatchedGenerator`'s batching
(longest first, token budget including image tokens, OOM -> split and retry, per-row EOS and stop
strings): rows are padded on the left by the processor, images of a batch are decoded and resized in
worker threads while the previous batch generates, and a row whose image fails to decode becomes an
``error`` row without touching the others.
"""

from __future__ import annotations

import logging
import os
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

from airflow_hfllm.engine.generate import BatchedGenerator, Cancelled, Completion, Request, generate_kwargs
from airflow_hfllm.engine.loading import LoadedModel
from airflow_hfllm.config import GenerationParams
from airflow_hfllm.vision.images import ImageLoader, decode_images
from airflow_hfllm.vision.processor import LoadedProcessor
from airflow_hfllm.vision.requests import VisionRequest

log = logging.getLogger(__name__)


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
                                 max(requests[i].max_new_tokens for i in rows), width)
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            out = model.generate(**inputs.to(device), **kwargs)
        generated = out[:, width:].tolist()
        done = dict(zip(rows, self._judged([(ids, requests[i].max_new_tokens) for i, ids in zip(rows, generated)])))
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
