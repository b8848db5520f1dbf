"""The fast engine: continuous batching over a static or paged KV cache, decode steps replayed as a CUDA graph.

``generate()`` of transformers pays Python overhead on every step and pads every batch to its slowest row.
Here a fixed number of *slots* decode together: a row that finishes leaves its slot and a waiting row is
prefilled into it, so the batch stays full. A decode step is the model's own modules over a KV cache of
fixed shape ``[slots, kv_heads, max_len, head_dim]`` per layer; on CUDA, one step is captured once into
a CUDA graph, replayed ``steps_per_sync`` times between host syncs, which harvest finished rows and admit
new ones (under a grammar, one step in two graphs: ``engine/steps.py``). Sampling is on the device with a
counter-based hash as its random source: row r's token at step t depends on (seed, row id, t) only, not on
its batch, and no host sync is needed per step.
Here is the runner; which rows wait and which slot each holds is ``engine/scheduler.py``, the forward
pass :class:`~airflow_hfllm.engine.decoder.Decoder`, the sampler ``engine/sampling.py``.

CUDA out of memory (KV cache, prefill, graph capture) does not end the job: the rows in slots go back to the
window (to restart from their prompt with the same samples), the state is rebuilt with half the slots (after
a prefill, half the prefill group), counted in :meth:`FastEngine.stats`. A row that does not fit in one slot
ends in ``error``; a KV cache of one slot that does not fit is an error naming its memory.

The same code runs eagerly on the CPU (how CI tests it). Supported: ``engine/arch``'s families, unquantized,
FP8, bitsandbytes 8-bit (no CUDA graphs) or 4-bit, adapters merged; anything else takes ``engine/generate.py``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

from airflow_hfllm.engine.cache import free_memory, in_memory
from airflow_hfllm.engine.generate import Cancelled, Completion, Request, cut_at_stop, eos_ids
from airflow_hfllm.engine.kv_cache import BlockPool, plan
from airflow_hfllm.engine.oom import out_of_memory
from airflow_hfllm.engine.prefix import Prefix, PrefixCache
from airflow_hfllm.engine.decoder import Decoder, kv_dtype, unsupported_reason
from airflow_hfllm.engine.logprobs import Columns, SlotLogprobs
from airflow_hfllm.engine.arch.layer import prefill_attention, padded, upload
from airflow_hfllm.engine.arch.longrope import recompute
from airflow_hfllm.engine.decoding import output_text
from airflow_hfllm.engine.grammar import constraint, judged
from airflow_hfllm.engine.sampling import Sampler, row_seed
from airflow_hfllm.engine.scheduler import Row, Scheduler
from airflow_hfllm.engine.steps import Captured, grammar_step
from airflow_hfllm.engine.loading import LoadedModel
from airflow_hfllm.config import GenerationParams

log = logging.getLogger(__name__)


class FastEngine:
    """Completions for many requests at once; see the module docstring.

    :param slots: rows decoding together; default from free GPU memory (at most ``kv_cache.MAX_SLOTS``), 16 on CPU.
    :param steps_per_sync: decode steps per graph replay between host syncs (1 under a grammar).
    :param prefill_tokens: tokens (rows x longest prompt) per prefill call.
    :param cuda_graphs: capture decode steps as a CUDA graph (default: on CUDA).
    :param decode_kernel: Triton decode attention, reading each row's own keys (default: on CUDA with Triton).
    :param prefix_reuse: compute a prompt prefix that rows share once (``engine/prefix.py``; text rows, not LongRoPE).
    :param grammar_overlap: under a grammar, compute each step's masks while the GPU runs its forward pass
        (``engine/steps.py``; default: on CUDA); ``False``: after the step, as on the CPU.
    :param compile: ``torch.compile`` the layers around attention (``engine/compiled.py``); a job decides by size.
    :param kv_cache_dtype: ``"auto"`` (the model's) or ``"fp8"`` (e4m3, ``decoder.stored``; a GPU of capability 8.9+).
    :param paged: a paged KV cache, each row holding blocks for its own length (``engine/kv_cache.py``);
        ``None``: where memory limits the slots on a GPU (``kv_cache.plan``), or where ``kv_blocks`` is given.
        ``kv_blocks``: how many (default: what free memory holds, up to every slot's widest row; with
        ``slots``, or on the CPU, as many as a static cache).
    """

    vision = False

    def __init__(self, loaded: LoadedModel, params: GenerationParams, *, slots: int | None = None,
                 steps_per_sync: int = 16, prefill_tokens: int = 16_384, cuda_graphs: bool | None = None,
                 decode_kernel: bool | None = None, prefix_reuse: bool = True, grammar_overlap: bool | None = None,
                 compile: bool | None = None, kv_cache_dtype: str = "auto", paged: bool | None = None,
                 kv_blocks: int | None = None,
                 should_stop: Callable[[], bool] | None = None, on_batch: Callable[[int, int], None] | None = None):
        reason = unsupported_reason(loaded, self.vision)
        if reason:
            raise ValueError(f"fast engine cannot run {loaded.spec.model}: {reason}")
        if params.num_beams != 1:
            raise ValueError("fast engine does not do beam search")
        import torch

        self.loaded, self.params, self.model = loaded, params, loaded.model
        self.device = next(self.model.parameters()).device
        self.dtype = self.model.get_input_embeddings().weight.dtype
        self.kv_dtype = kv_dtype(kv_cache_dtype, self.device, self.dtype)
        self.paging = True if paged is None and kv_blocks else paged  # None: kv_cache.plan decides
        self.kv_blocks, self.table = kv_blocks, None  # table: each slot's blocks, paged
        self.decoder = Decoder(self.model, kernel=decode_kernel, compile=compile)
        self.base = self.decoder.base
        self.vocab = self.model.get_output_embeddings().weight.shape[0]
        self.eos = eos_ids(loaded)
        self.constraint = constraint(params, loaded.tokenizer, self.vocab, self.eos)
        self.max_slots, self.prefill_tokens, self.steps_per_sync = slots, prefill_tokens, (
            1 if self.constraint else steps_per_sync)
        # bitsandbytes' 8-bit matmul asks the host whether a batch has outlier columns (LLM.int8's split) on
        # every call, which a CUDA graph cannot hold: its steps run eagerly
        self.cuda_graphs = (self.device.type == "cuda" and not getattr(self.model, "is_loaded_in_8bit", False)
                            ) if cuda_graphs is None else cuda_graphs
        if self.constraint:
            self.constraint.overlap = self.device.type == "cuda" if grammar_overlap is None else grammar_overlap
        self.should_stop, self.on_batch = should_stop or (lambda: False), on_batch or (lambda rows, tokens: None)
        self.capture_seconds = self.prefill_seconds = 0.0  # host seconds
        self.prefill_gpu_seconds = 0.0  # GPU time between each prefill's start and end events
        self.oom_splits = 0  # times the slots were halved after CUDA ran out of memory
        self.oom_errors = 0  # rows that ran out of memory alone in one slot (they end in error)
        self.steps, self.per_row_seeds, self._prefill_events = 0, True, []  # (start, end) CUDA events not yet added up
        self._shape = self._graph = None  # (slots, max_len, blocks) of the allocated state; the captured steps
        self.eos_tensor = torch.tensor(self.eos or [-1], device=self.device)
        self.sample = Sampler(params, self.vocab, self.eos, self.device)
        self._counted = bool(params.presence_penalty or params.frequency_penalty)
        self.columns = Columns(loaded.tokenizer)
        # not LongRoPE: its prompt's factors depend on the whole prompt's length (engine/arch/longrope.py)
        self.prefix = PrefixCache(prefix_reuse and not self.vision and not self.decoder.longrope)

    @property
    def paged(self) -> bool:
        return self.table is not None  # the allocated cache's layout

    def _release(self) -> None:
        self._graph = self._shape = self.table = None
        for name in ("k_cache", "v_cache", "presence", "counts", "out", "logprobs", "mask"):
            if hasattr(self, name):
                delattr(self, name)
        free_memory()

    def _allocate(self, slots: int, max_len: int, blocks: int | None) -> None:
        import torch

        from airflow_hfllm.engine.kv_cache import BLOCK

        if self._shape == (slots, max_len, blocks):
            return
        self._release()
        dev, n = self.device, len(self.decoder.layers)
        shape = (slots if blocks is None else blocks, self.decoder.kv_heads,
                 max_len if blocks is None else BLOCK, self.decoder.head_dim)
        # paged: every slot's blocks are block 0 (read by no row) until a row is admitted there
        self.table = None if blocks is None else torch.zeros((slots, max_len // BLOCK), dtype=torch.long, device=dev)
        self.k_cache = [torch.zeros(shape, dtype=self.kv_dtype, device=dev) for _ in range(n)]
        self.v_cache = [torch.zeros(shape, dtype=self.kv_dtype, device=dev) for _ in range(n)]
        self.tokens = torch.zeros(slots, dtype=torch.long, device=dev)  # last token, input of the next step
        self.pos = torch.zeros(slots, dtype=torch.long, device=dev)  # its index in the KV cache
        # rope position minus KV index: 0 for text; multimodal rope gives an image fewer positions than tokens
        self.rope_offset = torch.zeros(slots, dtype=torch.long, device=dev)
        self.n_gen = torch.zeros(slots, dtype=torch.long, device=dev)
        self.max_new = torch.ones(slots, dtype=torch.long, device=dev)
        self.done = torch.ones(slots, dtype=torch.bool, device=dev)
        self.seeds = torch.zeros(slots, dtype=torch.long, device=dev)
        self.out = torch.zeros((slots, max_len), dtype=torch.long, device=dev)
        self.presence = (torch.zeros((slots, self.vocab), dtype=torch.bool, device=dev)
                         if self.params.repetition_penalty != 1.0 else None)
        # how often each slot's row generated each token, for the presence and frequency penalties
        self.counts = torch.zeros((slots, self.vocab), device=dev) if self._counted else None
        k = self.params.logprobs  # the raw log-probabilities of each step's token and its k likeliest
        self.logprobs = None if k is None else SlotLogprobs(k, slots, max_len, dev)
        self.mask = self.constraint.allocate(slots, dev) if self.constraint else None
        self.arange_slots = torch.arange(slots, device=dev)
        self.arange_len = torch.arange(max_len, device=dev)
        self._shape = (slots, max_len, blocks)
        log.info("fast engine: %d slots x %d tokens of KV cache%s (%.1f GiB)", slots, max_len,
                 "" if blocks is None else f", paged: {blocks} blocks of {BLOCK}",
                 2 * n * self.k_cache[0].numel() * self.k_cache[0].element_size() / 2**30)

    def _steps(self, count: int) -> None:
        """``count`` decode steps, in place on the state tensors (this is what the CUDA graph holds)."""
        for _ in range(count):
            self._sampled(self._forward())

    def _forward(self, _=None):
        """A decode step's forward pass: each slot's next-token logits [slots, V]."""
        return self.decoder.decode(self.k_cache, self.v_cache, self.tokens, self.pos, self.rope_offset,
                                   self.arange_slots, self.arange_len, self.table)

    def _sampled(self, logits) -> None:
        """A decode step's draw from ``logits`` (under the grammar's masks) and its bookkeeping, in place."""
        self.advance(logits, self.decoder.stepping(self.done, self.pos + self.rope_offset))

    def advance(self, logits, live) -> None:
        """One step of the ``live`` rows [slots] from their ``logits`` [slots, V]: sampled, recorded, moved on."""
        import torch

        nxt = self.sample(logits, self.seeds, self.n_gen, self.counts, self.presence, self.mask)
        col = self.n_gen.clamp(max=self.out.shape[1] - 1)
        self.out[self.arange_slots, col] = torch.where(live, nxt, self.out[self.arange_slots, col])
        if self.logprobs is not None:  # the raw logits: the sampler does not change them in place
            self.logprobs.record(logits, nxt, self.arange_slots, col, live)
        if self.presence is not None:
            self.presence[self.arange_slots, nxt] |= live
        if self.counts is not None:
            self.counts.scatter_add_(1, nxt[:, None], live[:, None].to(self.counts.dtype))
        self.n_gen += live.long()
        finished = torch.isin(nxt, self.eos_tensor) | (self.n_gen >= self.max_new)
        self.done |= live & finished
        self.tokens.copy_(torch.where(live, nxt, self.tokens))
        self.pos.copy_(torch.where(live, self.pos + 1, self.pos))

    def _run_steps(self) -> None:
        import torch

        self.steps += self.steps_per_sync
        if self.constraint:  # one step, with its grammar's host work (engine/steps.py)
            return grammar_step(self)
        if not self.cuda_graphs:
            with torch.inference_mode():
                self._steps(self.steps_per_sync)
            return
        self._graph = self._graph or Captured(self, lambda: self._steps(1), lambda _: self._steps(1))
        for _ in range(self.steps_per_sync):
            self._graph(0)

    # -- scheduling ----------------------------------------------------------------------------------
    def generate(self, requests: Sequence[Request], seed: int | None = None, keys: Sequence | None = None
                 ) -> list[Completion]:
        """Completions for ``requests`` in order; ``keys`` (row ids) make each row's sample independent
        of its batch."""
        keys = list(keys) if keys is not None else list(range(len(requests)))
        results = dict(self.stream(((i, r, k) for i, (r, k) in enumerate(zip(requests, keys))), seed,
                                   lookahead=len(requests)))
        return [results[i] for i in range(len(requests))]

    def stream(self, items: Iterable[tuple[Any, Request, Any]], seed: int | None = None, lookahead: int = 1024
               ) -> Iterator[tuple[Any, Completion]]:
        """``(tag, completion)`` as rows finish, for ``(tag, request, key)`` items pulled lazily.

        Rows join free slots as others leave, across whatever boundaries the caller has (input chunks),
        so the batch stays full; :class:`~airflow_hfllm.engine.scheduler.Scheduler` says which rows, with
        ``lookahead`` rows waiting. A row longer than the KV cache waits until the running rows drain,
        then the cache is re-planned.
        """
        import torch

        seed = 0 if seed is None else seed
        sched = Scheduler(items, lookahead, self._enqueue, self._prepare, lambda r: self.prefix.cost(r.input_ids))
        sched.refill()
        if not sched.waiting:
            return
        with torch.inference_mode():
            while True:
                if self.should_stop():
                    raise Cancelled("stopped between decode steps")
                yield from sched.take_ended()
                if not sched.running:
                    if not sched.waiting:
                        return
                    if sched.needs_plan():
                        shape = plan(self, [row.request for row in sched.waiting])
                        if not in_memory(self._allocate, *shape):
                            out_of_memory(self, "allocating the KV cache", shape, sched)
                            continue
                        sched.resize(*self._shape[:2], BlockPool(self._shape[2]) if self.paged else None)
                        self.done.fill_(True)
                if not in_memory(self._admit_waiting, sched, seed):
                    out_of_memory(self, "prefill", self._shape, sched, prefill=True)
                    sched.refill()
                    continue
                yield from sched.take_ended()
                if not sched.running:  # every admitted row ended early (vision: bad images)
                    sched.refill()
                    continue
                if not in_memory(self._run_steps):
                    out_of_memory(self, "decode", self._shape, sched)
                    sched.refill()
                    continue
                yield from self._harvest(sched)
                sched.refill()

    def _enqueue(self, row: Row) -> None:
        """Called as a row enters the window (the vision engine starts decoding its images)."""

    def _prepare(self, row: Row) -> str | None:
        """Before a row's prefill: the error that ends it without a slot, or ``None`` (vision: its images)."""
        return None

    def _admit_waiting(self, sched: Scheduler, seed: int) -> None:
        """Prefill waiting rows into free slots, group by group; then LongRoPE rows at the original context again."""
        while group := sched.admit(self.prefill_tokens):
            if self.table is not None:  # the rows' blocks, before their prefill writes there
                where = self._upload([slot for slot, _ in group])
                self.table[where] = self._upload([row.blocks + [0] * (self.table.shape[1] - len(row.blocks))
                                                  for _, row in group])
            window = [row.request.input_ids for row in sched.waiting]
            for prefix, part in self.prefix.split([row.request.input_ids for _, row in group], window, self._prefix):
                slots, rows = zip(*(group[i] for i in part))
                self._admit([row.request for row in rows], list(slots), [row_seed(seed, row.key) for row in rows],
                            prefix)
        recompute(self, sched)

    def _add_prefill_events(self, sync: bool = False) -> None:
        """Adds up the prefills' GPU time: after a host sync (or ``sync``), their events have completed."""
        if sync and self._prefill_events:
            self._prefill_events[-1][1].synchronize()
        self.prefill_gpu_seconds += sum(start.elapsed_time(end) for start, end in self._prefill_events) / 1000
        self._prefill_events.clear()

    def stats(self) -> dict:
        """Where the time went, for the manifest: host-side seconds, and the prefills' GPU seconds."""
        self._add_prefill_events(sync=True)
        return {"prefill_seconds": round(self.prefill_seconds, 3), "capture_seconds": round(self.capture_seconds, 3),
                "prefill_gpu_seconds": round(self.prefill_gpu_seconds, 3), "decode_steps": self.steps,
                "slots": self._shape[0] if self._shape else None,
                "oom_splits": self.oom_splits, "oom_errors": self.oom_errors, **self.prefix.stats(),
                "compile_seconds": round(self.decoder.compiler.seconds, 3),
                **(self.constraint.stats() if self.constraint else {})}

    def _padded_ids(self, group: list[Request], skip: int = 0):
        """The group's prompt ids [n, W] after the first ``skip``, right-padded, on the device."""
        return self._upload(padded([r.input_ids[skip:] for r in group]))

    def _upload(self, values):
        return upload(values, self.device)

    def _inputs(self, group: list[Request], skip: int = 0):
        """(ids [n, W] right-padded, embeddings [n, W, D], positions [n, W] or [3, n, W], rope offsets [n] or
        ``None``, deepstack features or ``None``: a vision model's, see ``Decoder.prefill``) on the device,
        for the tokens after the shared prefix's ``skip``."""
        import torch

        ids = self._padded_ids(group, skip)
        positions = torch.arange(skip, skip + ids.shape[1], device=self.device).expand(*ids.shape)
        return ids, self.base.embed_tokens(ids), positions, None, None

    def _prefix(self, ids: list[int]):
        """A shared prefix's keys and values, per layer [kv_heads, P, head_dim]."""
        import torch

        dev, shape = self.device, (1, self.decoder.kv_heads, len(ids), self.decoder.head_dim)
        k, v = ([torch.empty(shape, dtype=self.dtype, device=dev) for _ in self.decoder.layers] for _ in "kv")
        with prefill_attention():
            self.decoder.prefill(k, v, self.base.embed_tokens(torch.tensor([ids], device=dev)),
                                 torch.arange(len(ids), device=dev)[None], torch.tensor([len(ids)], device=dev),
                                 torch.zeros(1, dtype=torch.long, device=dev))
        return [t[0] for t in k], [t[0] for t in v]

    def _admit(self, group: list[Request], slot_list: list[int], seeds: list[int], prefix: Prefix | None) -> None:
        import torch

        dev = self.device
        started = time.monotonic()
        if dev.type == "cuda":
            self._prefill_events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self._prefill_events[-1][0].record()
        with prefill_attention():  # the vision tower and the decoder
            skip = len(prefix.ids) if prefix else 0
            ids, x, positions, offsets, deepstack = self._inputs(group, skip)
            n, width = ids.shape
            lengths = self._upload([len(r.input_ids) - skip for r in group])
            slot_idx, seeds_t = self._upload(slot_list), self._upload(seeds)
            max_new = self._upload([r.max_new_tokens for r in group])
            presence = None
            if self.presence is not None:
                self.presence[slot_idx] = False
                valid = torch.arange(width, device=dev)[None, :] < lengths[:, None]
                rows = torch.arange(n, device=dev)[:, None].expand(n, width)
                presence = self.presence
                presence[slot_idx[rows[valid]], ids[valid]] = True
                if skip:
                    presence[slot_idx[:, None], self._upload(prefix.ids)[None]] = True
                presence = presence[slot_idx]
            logits = self.decoder.prefill(self.k_cache, self.v_cache, x, positions, lengths, slot_idx, deepstack,
                                          prefix.kv if prefix else None, self.table)
        mask = self.constraint.start(slot_list, dev) if self.constraint else None
        first = self.sample(logits, seeds_t, torch.zeros(n, dtype=torch.long, device=dev), None, presence, mask)
        if self.logprobs is not None:
            self.logprobs.record(logits, first, slot_idx, torch.zeros_like(slot_idx))
        if self.presence is not None:
            self.presence[slot_idx, first] = True
        if self.counts is not None:  # the first token was drawn before the row had generated anything
            self.counts[slot_idx] = 0
            self.counts[slot_idx, first] = 1
        self.tokens[slot_idx] = first
        self.pos[slot_idx] = lengths + skip
        self.rope_offset[slot_idx] = 0 if offsets is None else offsets
        self.n_gen[slot_idx] = 1
        self.max_new[slot_idx] = max_new
        self.seeds[slot_idx] = seeds_t
        self.out[slot_idx, 0] = first
        self.done[slot_idx] = torch.isin(first, self.eos_tensor) | (max_new <= 1)
        if self.constraint:
            self.constraint.admitted(slot_list, self.tokens, self.done, self.n_gen)
        if dev.type == "cuda":
            self._prefill_events[-1][1].record()
        # No sync: the host prepares the next group while the GPU runs this one (seconds are host-side).
        self.prefill_seconds += time.monotonic() - started

    def _harvest(self, sched: Scheduler) -> Iterator[tuple[Any, Completion]]:
        done = self.done.tolist()  # the host sync of a replay (and a grammar's, of its tokens, just before)
        self._add_prefill_events()
        finished = [s for s, row in enumerate(sched.slots) if row is not None and done[s]]
        if not finished:
            return
        counts, outputs = self.n_gen[finished].tolist(), self.out[finished].tolist()
        records = self.logprobs.read(finished, max(counts)) if self.logprobs is not None else [None] * len(counts)
        rows = [sched.release(s) for s in finished]
        if self.table is not None:  # their blocks may go to other rows: the slots' writes go to block 0 now
            self.table[self._upload(finished)] = 0
        ends = [self._completion(ids[:n], row.request.max_new_tokens) for row, n, ids in zip(rows, counts, outputs)]
        completions = []
        for row, completion, ids, record in zip(rows, judged(self.constraint, ends), outputs, records):
            completion.logprob, completion.top_logprobs = self.columns(ids[:completion.output_tokens], record)
            completions.append((row.tag, completion))
        self.on_batch(len(finished), sum(c.output_tokens for _, c in completions))
        yield from completions

    def _completion(self, ids: list[int], max_new_tokens: int) -> tuple[Completion, list[int]]:
        """A finished row's completion, not yet judged by the constraint, and its output tokens."""
        finish = "length"
        if ids and ids[-1] in self.eos:
            ids, finish = ids[:-1], "stop"
        text, finish = cut_at_stop(output_text(self.loaded.tokenizer, ids), finish, self.params.stop)
        return Completion(text, len(ids), finish), ids
