"""Batched generation with ``model.generate()``: the portable path (CPU, and any model on GPU).

Prompts are sorted by length so a batch wastes little padding, batches are sized by a token budget
(rows x (longest prompt + new tokens)), padded on the left, and each row stops at its own EOS. A CUDA
out-of-memory error splits the batch in two and retries, shrinking the budget for later batches;
only a single row that does not fit on its own becomes an ``error`` row. No row is ever dropped; the
splits are counted in :meth:`BatchedGenerator.stats` (the manifest's ``engine_stats``).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

from airflow_hfllm.engine.cache import free_memory
from airflow_hfllm.engine.loading import LoadedModel
from airflow_hfllm.engine.decoding import output_text
from airflow_hfllm.engine.logprobs import Columns, steps_record
from airflow_hfllm.config import GenerationParams

log = logging.getLogger(__name__)


class Cancelled(RuntimeError):
    """The job was asked to stop (``on_kill``, Ctrl-C); raised between batches."""


@dataclass
class Request:
    input_ids: list[int]
    max_new_tokens: int


@dataclass
class Completion:
    text: str | None
    output_tokens: int
    finish_reason: str  # "stop" | "length" | "error"
    error: str | None = None
    logprob: float | None = None  # logprobs=K: the output's tokens' summed log-probability
    top_logprobs: list | None = None  # and each token's, with its K likeliest alternatives
    choice_logprobs: list | None = None  # choices with logprobs: each choice's total (engine/choices.py)


def cut_at_stop(text: str, finish: str, stop: Sequence[str]) -> tuple[str, str]:
    """The text before the first stop string (which is not included), as the OpenAI API does."""
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    return (text[:cut], "stop") if cut >= 0 else (text, finish)


def eos_ids(loaded: LoadedModel) -> list[int]:
    ids = loaded.model.generation_config.eos_token_id
    ids = list(ids) if isinstance(ids, (list, tuple)) else ([] if ids is None else [ids])
    if loaded.tokenizer.eos_token_id is not None and loaded.tokenizer.eos_token_id not in ids:
        ids.append(loaded.tokenizer.eos_token_id)
    return ids


def kv_bytes_per_token(model, dtype) -> int:
    import torch

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8


def default_token_budget(loaded: LoadedModel) -> int:
    """Tokens (rows x sequence length) per batch: from free GPU memory, a fixed amount on CPU."""
    import torch

    if loaded.device.type != "cuda":
        return 16_384
    free, _ = torch.cuda.mem_get_info(loaded.device)
    per_token = kv_bytes_per_token(loaded.model, loaded.dtype)
    # Half of free memory for the KV cache; the rest covers activations and allocator slack.
    return max(2048, min(4_000_000, int(0.5 * free / per_token)))


def generate_kwargs(params: GenerationParams, pad: int, eos: list[int], tokenizer, max_new: int, width: int
                    ) -> dict:
    """``generate()`` arguments for ``params`` (as :class:`BatchedGenerator` passes them), for prompts
    left-padded to ``width`` tokens."""
    kwargs = dict(max_new_tokens=max_new, do_sample=params.do_sample, use_cache=params.use_cache,
                  pad_token_id=pad, eos_token_id=eos, num_beams=params.num_beams)
    if params.do_sample:
        kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
    else:  # the model's generation_config may carry sampling defaults; greedy ignores them
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if params.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = params.repetition_penalty
    if params.min_length:
        kwargs["min_new_tokens"] = params.min_length
    if params.num_beams > 1:
        kwargs["length_penalty"] = params.length_penalty
    if params.stop:
        kwargs.update(stop_strings=list(params.stop), tokenizer=tokenizer)
    if params.presence_penalty or params.frequency_penalty:
        kwargs["logits_processor"] = penalties(params, width)
    if params.logprobs is not None:  # every step's raw logits, kept until the batch ends
        kwargs.update(output_logits=True, return_dict_in_generate=True)
    return kwargs


def penalties(params: GenerationParams, width: int):
    """The presence and frequency penalties as a logits processor (transformers has none), over the tokens
    after ``width``: ``generate()`` runs it after the repetition penalty, before temperature, top-k and top-p."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from airflow_hfllm.engine.sampling import penalise

    class Penalties(LogitsProcessor):
        def __call__(self, input_ids, scores):
            generated = input_ids[:, width:]
            ones = torch.ones_like(generated, dtype=scores.dtype)
            counts = torch.zeros_like(scores).scatter_add_(1, generated, ones)
            return penalise(scores, counts, params.presence_penalty, params.frequency_penalty)

    return LogitsProcessorList([Penalties()])


class BatchedGenerator:
    """:param max_batch_size: cap on rows per batch; the token budget does the rest."""

    def __init__(
        self,
        loaded: LoadedModel,
        params: GenerationParams,
        *,
        max_batch_size: int | None = None,
        token_budget: int | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_batch: Callable[[int, int], None] | None = None,
    ):
        self.loaded = loaded
        self.params = params
        on_gpu = loaded.device.type == "cuda"
        self.max_batch_size = max_batch_size or (256 if on_gpu else 32)
        self.token_budget = token_budget or default_token_budget(loaded)
        self.should_stop = should_stop or (lambda: False)
        self.on_batch = on_batch or (lambda rows, tokens: None)
        self.eos = eos_ids(loaded)
        self.pad = loaded.tokenizer.pad_token_id
        self.columns = Columns(loaded.tokenizer)
        self.oom_splits = 0  # batches split in two after CUDA ran out of memory
        self.oom_errors = 0  # rows that ran out of memory on their own (they end in error)
        from airflow_hfllm.engine.grammar import constraint

        self.constraint = constraint(params, loaded.tokenizer, loaded.model, self.eos)
        if params.num_beams == 1 and params.length_penalty != 1.0:
            log.warning("length_penalty only applies to beam search (num_beams > 1); ignored")

    def batches(self, requests: Sequence[Request]) -> list[list[int]]:
        """Indices of ``requests`` grouped into batches, longest prompts first."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].input_ids))
        batches, current, longest, most_new = [], [], 0, 0
        for i in order:
            length, new = len(requests[i].input_ids), requests[i].max_new_tokens
            grown = (len(current) + 1) * (max(longest, length) + max(most_new, new))
            if current and (len(current) >= self.max_batch_size or grown > self.token_budget):
                batches.append(current)
                current, longest, most_new = [], 0, 0
            current.append(i)
            longest, most_new = max(longest, length), max(most_new, new)
        if current:
            batches.append(current)
        return batches

    def generate(self, requests: Sequence[Request], seed: int | None = None, keys: Sequence | None = None
                 ) -> list[Completion]:
        """Completions in order. Sampling is seeded once per call: a row's sample depends on its batch
        (``keys`` are accepted for the fast engine's interface and not used)."""
        import torch

        if seed is not None:
            torch.manual_seed(seed)
        results: dict[int, Completion] = {}
        for batch in self.batches(requests):
            if self.should_stop():
                raise Cancelled("stopped between batches")
            done = self._run(batch, requests)
            results.update(done)
            self.on_batch(len(batch), sum(c.output_tokens for c in done.values()))
        return [results[i] for i in range(len(requests))]

    def _run(self, batch: list[int], requests: Sequence[Request]) -> dict[int, Completion]:
        import torch

        try:
            return self._generate(batch, requests)
        except torch.OutOfMemoryError:
            pass
        # Retried only here, after the except block: while it runs, the error's traceback holds the failed
        # call's frames, and with them its tensors (the KV cache generate() had built), so the halves
        # would run next to that memory and fail in turn.
        free_memory()
        tokens = len(batch) * max(len(requests[i].input_ids) + requests[i].max_new_tokens for i in batch)
        if len(batch) == 1:
            self.oom_errors += 1
            log.warning("one row does not fit in GPU memory (%d tokens); marked as error", tokens)
            return {batch[0]: Completion(None, 0, "error", f"out of GPU memory for {tokens} tokens")}
        self.oom_splits += 1
        self.token_budget = max(1, min(self.token_budget, tokens // 2))
        log.warning("CUDA out of memory on %d rows; splitting the batch, token budget now %d",
                    len(batch), self.token_budget)
        half = len(batch) // 2
        return self._run(batch[:half], requests) | self._run(batch[half:], requests)

    def stats(self) -> dict:
        """Out-of-memory handling, for the manifest: batches split, rows that did not fit alone, and the
        token budget batches are now sized by."""
        return {"oom_splits": self.oom_splits, "oom_errors": self.oom_errors, "token_budget": self.token_budget}

    def _generate(self, batch: list[int], requests: Sequence[Request]) -> dict[int, Completion]:
        import torch

        model, tokenizer, p = self.loaded.model, self.loaded.tokenizer, self.params
        rows = [requests[i].input_ids for i in batch]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for n, ids in enumerate(rows):
            input_ids[n, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[n, width - len(ids):] = 1
        device = model.device if hasattr(model, "device") else self.loaded.device
        max_new = max(requests[i].max_new_tokens for i in batch)
        kwargs = generate_kwargs(p, self.pad, self.eos, tokenizer, max_new, width)
        if self.constraint is not None:
            from airflow_hfllm.engine.grammar import generate_hooks

            kwargs = generate_hooks(self.constraint, kwargs)
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs
            )
        generated = (out.sequences if p.logprobs is not None else out)[:, width:]
        records = steps_record(out.logits, generated, p.logprobs) if p.logprobs is not None else [None] * len(batch)
        generated = generated.tolist()
        done = dict(zip(batch, self._judged([(ids, requests[i].max_new_tokens) for i, ids in zip(batch, generated)])))
        for i, ids, record in zip(batch, generated, records):
            done[i].logprob, done[i].top_logprobs = self.columns(ids[:done[i].output_tokens], record)
        return done

    def _judged(self, outputs: list[tuple[list[int], int]]) -> list[Completion]:
        """The completions of ``outputs`` (each a row's generated tokens and its ``max_new_tokens``), judged by
        the job's constraint together."""
        from airflow_hfllm.engine.grammar import judged

        return judged(self.constraint, [self._completion(ids, max_new) for ids, max_new in outputs])

    def _completion(self, ids: list[int], max_new_tokens: int) -> tuple[Completion, list[int]]:
        """A row's completion, not yet judged by the constraint, and its output tokens."""
        finish = "length"
        for n, token in enumerate(ids):
            if token in self.eos:
                ids, finish = ids[:n], "stop"
                break
        while ids and ids[-1] == self.pad:  # a row stopped by a stop string is padded after it
            ids = ids[:-1]
        if len(ids) > max_new_tokens:  # this row asked for fewer tokens than the batch's longest
            ids, finish = ids[:max_new_tokens], "length"
        text = output_text(self.loaded.tokenizer, ids)
        count = len(ids)
        text, finish = cut_at_stop(text, finish, self.params.stop)
        if finish == "length" and count < max_new_tokens:
            finish = "stop"
        return Completion(text, count, finish), ids
