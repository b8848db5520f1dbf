"""Which engine runs a job, and one way to drive either: started chunks in, generated chunks out.

The fast engine takes all chunks as one stream of rows, so its batch stays full across chunk
boundaries, and a chunk comes out as soon as all its rows are done; the batched ``generate()`` path
runs a chunk at a time, seeded per chunk as it always was (so its folders keep resuming).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Callable, Iterable, Iterator

from airflow_hfllm.run.rows import Chunk

Generated = tuple[Chunk, dict]  # a chunk, and its rows' completions by position


def chunk_seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:6], "big")


class Driver:
    """One engine behind the job loop's single interface."""

    name = ""

    def __init__(self, generator, scorer=None):
        self.generator = generator
        self.scorer = scorer  # choices with logprobs: engine/choices.py

    def scored(self, chunk: Chunk, completions: dict) -> Generated:
        """The chunk, its completions given each choice's log-probability after the row's prompt."""
        done = [i for i, c in completions.items() if c.finish_reason != "error"]
        if self.scorer and done:
            for i, scores in zip(done, self.scorer([chunk.rows[i].request.input_ids for i in done])):
                completions[i].choice_logprobs = scores
        return chunk, completions

    def run(self, chunks: Iterable[Chunk], seed: int) -> Iterator[Generated]:
        raise NotImplementedError

    @property
    def compile_seconds(self) -> float:
        return 0.0

    def stats(self) -> dict:
        return self.generator.stats()


class BatchedDriver(Driver):
    name = "batched-generate"

    def run(self, chunks: Iterable[Chunk], seed: int) -> Iterator[Generated]:
        for chunk in chunks:
            todo = chunk.todo
            completions = self.generator.generate([chunk.rows[i].request for i in todo],
                                                  seed=chunk_seed(seed, chunk.index),
                                                  keys=[chunk.rows[i].key for i in todo]) if todo else []
            yield self.scored(chunk, dict(zip(todo, completions)))


class StreamDriver(Driver):
    name = "fast"

    @property
    def compile_seconds(self) -> float:  # CUDA-graph capture, and torch.compile where on (engine/compiled.py)
        return self.generator.capture_seconds + self.generator.decoder.compiler.seconds

    def run(self, chunks: Iterable[Chunk], seed: int) -> Iterator[Generated]:
        open_chunks: dict[int, tuple[Chunk, dict, int]] = {}
        ready: list[int] = []

        def rows():
            for chunk in chunks:
                todo = chunk.todo
                open_chunks[chunk.index] = (chunk, {}, len(todo))
                if not todo:  # nothing to generate (all rows unsafe or bad): out with the next result
                    ready.append(chunk.index)
                for i in todo:
                    yield (chunk.index, i), chunk.rows[i].request, chunk.rows[i].key

        def flush():
            while ready:
                chunk, completions, _ = open_chunks.pop(ready.pop(0))
                yield self.scored(chunk, completions)

        for (index, i), completion in self.generator.stream(rows(), seed=seed):
            _, completions, wanted = open_chunks[index]
            completions[i] = completion
            if len(completions) == wanted:
                ready.append(index)
            yield from flush()
        yield from flush()
        if open_chunks:  # every row the engine took must come back
            raise RuntimeError(f"fast engine returned no result for rows of chunks {sorted(open_chunks)}")


def choose(kind, loaded, params, config, *, should_stop: Callable[[], bool], on_batch, log: logging.Logger,
           model_name: str, output_tokens: int = 0) -> Driver:
    """The fast engine where the model and device allow (or ``engine='fast'`` asks), else batched
    ``generate()``; the log says which and why. With ``compile="auto"``, a text job of at least
    ``COMPILE_MIN_TOKENS`` (most) ``output_tokens`` on a GPU compiles the fast engine's layers
    (``engine/compiled.py``), unless bitsandbytes quantized them."""
    from airflow_hfllm.engine.choices import ChoiceScorer
    from airflow_hfllm.engine.compiled import COMPILE_MIN_TOKENS
    from airflow_hfllm.engine.fast import unsupported_reason
    from airflow_hfllm.engine.loading import quant_method

    common = dict(should_stop=should_stop, on_batch=on_batch)
    scorer = ChoiceScorer(loaded, params.choices) if params.scores_choices else None
    (fast, fast_kwargs), batched = kind.engines(loaded, params, config, **common)
    reason = "asked for" if config.engine == "batched" else unsupported_reason(loaded, kind.vision)
    if reason is None and config.engine == "auto" and loaded.device.type != "cuda":
        reason = "no GPU (the fast engine's CUDA graphs need one)"
    if reason is None and config.engine == "auto" and getattr(loaded.model, "is_loaded_in_8bit", False):
        # correct on an H200 (tests/gpu/test_quantized_gpu.py), but its steps run without CUDA graphs: unmeasured
        reason = "bitsandbytes 8-bit runs on the fast engine only with engine='fast' until its speed is measured"
    if reason is None:
        # bitsandbytes' kernels break torch.compile's graphs: the 7B 4-bit batch ran 10,848 -> 6,395 tok/s compiled
        compile = {"on": True, "off": False}.get(
            config.compile, loaded.device.type == "cuda" and not kind.vision and output_tokens >= COMPILE_MIN_TOKENS
            and quant_method(loaded.model.config) != "bitsandbytes")
        log.info("engine: fast (continuous batching%s%s) on %s",
                 ", CUDA graphs" if loaded.device.type == "cuda" else "",
                 ", layers compiled (torch.compile)" if compile else "", loaded.device)
        return StreamDriver(fast(loaded, params, slots=config.batch_size, compile=compile,
                                 kv_cache_dtype=config.kv_cache_dtype, **common, **fast_kwargs), scorer)
    if config.engine == "fast":
        raise ValueError(f"engine='fast' cannot run {model_name}: {reason}")
    generator = batched()
    if config.kv_cache_dtype != "auto":
        log.warning("kv_cache_dtype=%r is the fast engine's: batched generate() keeps the model's dtype",
                    config.kv_cache_dtype)
    log.info("engine: batched generate() on %s (batch cap %d rows, token budget %d): %s",
             loaded.device, generator.max_batch_size, generator.token_budget, reason)
    return BatchedDriver(generator, scorer)
