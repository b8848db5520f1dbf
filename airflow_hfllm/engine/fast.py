"""The fast engine: continuous batching over a static KV cache, decode steps replayed as a CUDA graph.

``generate()`` of transformers pays Python overhead on every step and pads every batch to its slowest
row. Here a fixed number of *slots* decode together: a row that finishes leaves its slot and a waiting
row is prefilled into it, so the batch stays full. One decode step is the model's own modules (its
norms, projections, MLP and rotary embedding, so the math is the model's) over a KV cache of fixed
shape ``[slots, kv_heads, max_len, head_dim]`` per layer; on CUDA, ``steps_per_sync`` steps are
captured once into a CUDA graph and replayed, so the host launches one graph instead of thousands of
kernels. Sampling (temperature, top-k, top-p, repetition, presence and frequency penalties) happens on
the device with a counter-based hash as its random source: row r's token at step t depends on (seed,
row id, t) only, so a row's sample does not depend on what it was batched with, and no host sync is
needed per step.
The host syncs once per graph replay to harvest finished rows and admit new ones.

CUDA out of memory (the KV cache, a prefill group, a graph capture) does not end the job: the rows in slots
go back to the waiting window (they restart from their prompt with the same samples, which depend on
seed, row id and step only), the state is rebuilt with half the slots (and, after a prefill, half the
prefill group), and the halvings are counted in :meth:`FastEngine.stats`. A row that does not fit in one
slot ends in ``error``; a KV cache of one slot that does not fit is an error naming the memory it needs.

The same code runs eagerly on the CPU, which is how CI tests the scheduling and the KV cache.
Supported: Llama/Qwen2/Mistral-style decoders, unquantized, adapters merged. Anything else takes the
batched ``generate()`` path (``engine/generate.py``), and the job logs why.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

from airflow_hfllm.engine.generate import Cancelled, Completion, Request, cut_at_stop, eos_ids, kv_bytes_per_token
from airflow_hfllm.engine.layers import decoder_layer, prefill_attention, right_padded, text_config, text_model
from airflow_hfllm.engine.sampling import mix, penalise, row_seed
from airflow_hfllm.engine.loading import LoadedModel
from airflow_hfllm.config import GenerationParams

log = logging.getLogger(__name__)

ARCHITECTURES = ("llama", "qwen2", "mistral")
VISION_ARCHITECTURES = ("qwen2_vl", "qwen2_5_vl")  # decoders with multimodal rope: VisionFastEngine
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "mrope")


def unsupported_reason(loaded: LoadedModel, vision: bool = False) -> str | None:
    """Why the fast engine (``vision``: :class:`~airflow_hfllm.vision.fast.VisionFastEngine`) cannot
    run this model, or ``None`` when it can."""
    model = loaded.model
    archs = VISION_ARCHITECTURES if vision else ARCHITECTURES
    if model.config.model_type not in archs:
        return f"architecture {model.config.model_type!r} is not one of {archs}"
    cfg = text_config(model.config)
    if getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False) or \
            getattr(cfg, "quantization_config", None):
        return "quantized weights"
    if type(model).__name__.startswith("Peft"):
        return "unmerged PEFT adapter"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ROPE_TYPES:
        return f"rope type {rope.get('rope_type')!r}"
    if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
        return "sliding-window attention"
    base = text_model(model)
    if base is None or not all(hasattr(base, a) for a in ("layers", "rotary_emb", "embed_tokens", "norm")) \
            or not hasattr(model, "lm_head"):
        return "unexpected module layout"
    return None


class FastEngine:
    """Completions for many requests at once; see the module docstring.

    :param slots: rows decoding together; default from free GPU memory (capped at 256), 16 on CPU.
    :param steps_per_sync: decode steps per graph replay between host syncs.
    :param prefill_tokens: tokens (rows x longest prompt) per prefill call.
    :param cuda_graphs: capture decode steps as a CUDA graph (default: on CUDA).
    """

    vision = False

    def __init__(self, loaded: LoadedModel, params: GenerationParams, *, slots: int | None = None,
                 steps_per_sync: int = 16, prefill_tokens: int = 16_384, cuda_graphs: bool | None = None,
                 should_stop: Callable[[], bool] | None = None, on_batch: Callable[[int, int], None] | None = None):
        reason = unsupported_reason(loaded, self.vision)
        if reason:
            raise ValueError(f"fast engine cannot run {loaded.spec.model}: {reason}")
        if params.num_beams != 1:
            raise ValueError("fast engine does not do beam search")
        import torch

        self.loaded, self.params = loaded, params
        self.model = loaded.model
        self.device = next(self.model.parameters()).device
        self.dtype = self.model.get_input_embeddings().weight.dtype
        cfg = text_config(self.model.config)
        self.base = text_model(self.model)
        self.layers = list(self.base.layers)
        self.mrope_section = (getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None)
                              or {}).get("mrope_section")
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.vocab = self.model.get_output_embeddings().weight.shape[0]
        self.eos = eos_ids(loaded)
        self.max_slots = slots
        self.steps_per_sync = steps_per_sync
        self.prefill_tokens = prefill_tokens
        self.cuda_graphs = (self.device.type == "cuda") if cuda_graphs is None else cuda_graphs
        self.should_stop = should_stop or (lambda: False)
        self.on_batch = on_batch or (lambda rows, tokens: None)
        self.capture_seconds = 0.0
        self.prefill_seconds = 0.0
        self.steps = 0
        self.oom_splits = 0  # times the slots were halved after CUDA ran out of memory
        self.oom_errors = 0  # rows that ran out of memory alone in one slot (they end in error)
        self.per_row_seeds = True
        self._shape = None  # (slots, max_len) of the allocated state
        self._graph = None
        self.eos_tensor = torch.tensor(self.eos or [-1], device=self.device)
        self._counted = bool(params.presence_penalty or params.frequency_penalty)
        self._early: list[tuple[Any, Completion]] = []  # rows that end before taking a slot (vision: bad image)
        self._block: dict[int, int] = {}  # see stream()

    # -- sizing ------------------------------------------------------------------------------------
    def _plan(self, requests: Sequence[Request]) -> tuple[int, int]:
        """(slots, max_len): max_len fits the longest row, rounded up so later chunks reuse the graph."""
        import torch

        need = max(len(r.input_ids) + r.max_new_tokens for r in requests)
        max_len = 1 << max(6, math.ceil(math.log2(need)))
        if self._shape and self._shape[1] >= need:
            return self._shape
        if self.max_slots:
            slots = self.max_slots
        elif self.device.type == "cuda":
            self._release()
            free, _ = torch.cuda.mem_get_info(self.device)
            per_slot = (max_len * kv_bytes_per_token(self.model, self.dtype)
                        + self.vocab * (12 if self._counted else 8))
            # Leave room for prefill activations and the allocator.
            slots = int(max(0, free - 6 * 2**30) * 0.85 // per_slot)
            slots = max(8, min(256, slots // 8 * 8))
        else:
            slots = 16
        return slots, max_len

    def _release(self) -> None:
        self._graph = None
        self._shape = None
        for name in ("k_cache", "v_cache", "presence", "counts", "out"):
            if hasattr(self, name):
                delattr(self, name)
        from airflow_hfllm.engine.cache import free_memory

        free_memory()

    def _allocate(self, slots: int, max_len: int) -> None:
        import torch

        if self._shape == (slots, max_len):
            return
        self._release()
        dev, n = self.device, len(self.layers)
        shape = (slots, self.kv_heads, max_len, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=dev) for _ in range(n)]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=dev) for _ in range(n)]
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
        self.arange_slots = torch.arange(slots, device=dev)
        self.arange_len = torch.arange(max_len, device=dev)
        self.arange_vocab = torch.arange(self.vocab, device=dev)
        self._shape = (slots, max_len)
        log.info("fast engine: %d slots x %d tokens of KV cache (%.1f GiB)", slots, max_len,
                 2 * n * slots * max_len * self.kv_heads * self.head_dim * self.k_cache[0].element_size() / 2**30)

    # -- the model -----------------------------------------------------------------------------------
    def _attention_block(self, layer, x, cos, sin, write, attend):
        return decoder_layer(layer, x, cos, sin, write, attend, (self.heads, self.kv_heads, self.head_dim))

    def _rope(self, x, positions):
        """cos, sin [n, T, head_dim] for ``positions`` [n, T] (or [3, n, T] for multimodal rope)."""
        import torch

        if self.mrope_section and positions.dim() == 2:  # the same position on the t, h and w axes
            positions = positions[None].expand(3, -1, -1)
        cos, sin = self.base.rotary_emb(x, positions)
        if cos.dim() == 4:  # older multimodal rope returns the three (t, h, w) tables; pick their sections
            sections = list(self.mrope_section) * 2
            cos, sin = (torch.cat([m[i % 3] for i, m in enumerate(c.split(sections, dim=-1))], dim=-1)
                        for c in (cos, sin))
        return cos, sin

    def _prefill(self, x, positions, lengths, slot_idx):
        """Embedded prompts x [n, T, D], right-padded, into slots ``slot_idx``; returns last-position
        logits [n, V]."""
        import torch
        import torch.nn.functional as F

        n, t, _ = x.shape
        cos, sin = self._rope(x, positions)

        def write(l, k, v):
            self.k_cache[l][slot_idx, :, :t] = k
            self.v_cache[l][slot_idx, :, :t] = v

        def attend(l, q, k, v, scale):
            # Causal attention over the prompt itself; padding sits after each row's last token.
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                  enable_gqa=self.kv_heads != self.heads)

        for layer in self.layers:
            x = self._attention_block(layer, x, cos, sin, write, attend)
        last = x[torch.arange(n, device=self.device), lengths - 1]
        return self.model.lm_head(self.base.norm(last)).float()

    def _decode_logits(self):
        import torch.nn.functional as F

        x = self.base.embed_tokens(self.tokens[:, None])
        cos, sin = self._rope(x, (self.pos + self.rope_offset)[:, None])
        mask = (self.arange_len[None, :] <= self.pos[:, None])[:, None, None, :]

        def write(l, k, v):
            self.k_cache[l][self.arange_slots, :, self.pos] = k[:, :, 0]
            self.v_cache[l][self.arange_slots, :, self.pos] = v[:, :, 0]

        def attend(l, q, k, v, scale):
            return F.scaled_dot_product_attention(q, self.k_cache[l], self.v_cache[l], attn_mask=mask, scale=scale,
                                                  enable_gqa=self.kv_heads != self.heads)

        for layer in self.layers:
            x = self._attention_block(layer, x, cos, sin, write, attend)
        return self.model.lm_head(self.base.norm(x[:, 0])).float()

    # -- sampling ------------------------------------------------------------------------------------
    def _pick(self, logits, seeds, step, counts, presence):
        """Next tokens [n] from logits [n, V]; ``step`` [n] is the index of the token being drawn."""
        import torch

        p = self.params
        if presence is not None:
            penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(presence, penalised, logits)
        if counts is not None:
            logits = penalise(logits, counts, p.presence_penalty, p.frequency_penalty)
        if p.min_length and self.eos:
            early = (step < p.min_length)[:, None] & torch.isin(self.arange_vocab, self.eos_tensor)[None, :]
            logits = logits.masked_fill(early, float("-inf"))
        if not p.do_sample:
            return logits.argmax(-1)
        logits = logits / p.temperature
        if p.top_k and p.top_k < self.vocab:
            kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = (cum - sorted_logits.softmax(-1)) > p.top_p  # keep the token that crosses top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        # Gumbel-max with a counter-based hash of (row seed, step, token): no RNG state, no host sync.
        x = mix(seeds[:, None] ^ mix(step[:, None] * 1_000_003 + self.arange_vocab[None, :] + 1))
        u = ((x >> 11) & ((1 << 52) - 1)).double().add(0.5).div(float(1 << 52)).float()
        return (logits - torch.log(-torch.log(u))).argmax(-1)

    def _steps(self, count: int) -> None:
        """``count`` decode steps, in place on the state tensors (this is what the CUDA graph holds)."""
        import torch

        for _ in range(count):
            logits = self._decode_logits()
            nxt = self._pick(logits, self.seeds, self.n_gen, self.counts, self.presence)
            live = ~self.done
            col = self.n_gen.clamp(max=self.out.shape[1] - 1)
            self.out[self.arange_slots, col] = torch.where(live, nxt, self.out[self.arange_slots, col])
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
        if not self.cuda_graphs:
            with torch.inference_mode():
                self._steps(self.steps_per_sync)
            return
        if self._graph is None:
            started = time.monotonic()
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            # the warm-up step is a real one: undo it (the penalties' tensors too, or it would count twice)
            state = [t for t in (self.tokens, self.pos, self.n_gen, self.done, self.out, self.presence, self.counts)
                     if t is not None]
            saved = [t.clone() for t in state]
            with torch.cuda.stream(stream), torch.inference_mode():
                self._steps(1)  # warm-up: lazy inits and autotuning outside the graph
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(graph):
                self._steps(self.steps_per_sync)
            for t, s in zip(state, saved):
                t.copy_(s)
            self._graph = graph
            self.capture_seconds += time.monotonic() - started
            log.info("fast engine: captured %d decode steps as a CUDA graph in %.1f s", self.steps_per_sync,
                     time.monotonic() - started)
        self._graph.replay()

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
        so the batch stays full. Up to ``lookahead`` items wait in a window, admitted longest first within
        each block of ``lookahead`` items in arrival order: a row waits for its own block and those before
        it only, so the caller's chunks finish in order (otherwise the short rows of every chunk would
        wait behind longer rows arriving later, and no chunk could be written before the stream's end). A
        row longer than the KV cache waits until the running rows drain, then the cache is re-planned.
        """
        import torch

        items = iter(items)
        seed = 0 if seed is None else seed
        window: list[tuple[Any, Request, Any]] = []
        exhausted = False
        arrived = 0
        self._block = {}  # id(item) -> its arrival block, while it waits

        def pull(n: int) -> None:
            nonlocal exhausted, arrived
            while not exhausted and len(window) < n:
                item = next(items, None)
                if item is None:
                    exhausted = True
                else:
                    window.append(item)
                    self._block[id(item)] = arrived // lookahead
                    arrived += 1
                    self._enqueue(item)

        pull(lookahead)
        if not window:
            return
        owner: list = []
        with torch.inference_mode():
            while True:
                if self.should_stop():
                    raise Cancelled("stopped between decode steps")
                yield from self._take_early()
                if not any(o is not None for o in owner):
                    if not window:
                        return
                    if not owner or not any(self._fits(r) for _, r, _ in window):
                        plan = self._plan([r for _, r, _ in window])
                        if not self._in_memory(self._allocate, *plan):
                            owner = self._out_of_memory("allocating the KV cache", plan, owner, window)
                            continue
                        owner = [None] * self._shape[0]
                        self.done.fill_(True)
                if not self._in_memory(self._admit_waiting, window, owner, seed):
                    owner = self._out_of_memory("prefill", self._shape, owner, window, prefill=True)
                    pull(lookahead)
                    continue
                yield from self._take_early()
                if not any(o is not None for o in owner):  # every admitted row ended early (vision: bad images)
                    pull(max(lookahead, 2 * len(owner)))
                    continue
                if not self._in_memory(self._run_steps):
                    owner = self._out_of_memory("decode", self._shape, owner, window)
                    pull(lookahead)
                    continue
                yield from self._harvest(owner)
                pull(max(lookahead, 2 * len(owner)))

    @staticmethod
    def _in_memory(fn, *args) -> bool:
        """``fn(*args)``; False when CUDA ran out of memory. The error ends here, before anything is freed or
        retried: while it is handled, its traceback holds the failed call's frames and their tensors."""
        import torch

        try:
            fn(*args)
        except torch.OutOfMemoryError:
            return False
        return True

    def _out_of_memory(self, where: str, plan: tuple[int, int], owner: list, window: list,
                       prefill: bool = False) -> list:
        """After CUDA ran out of memory ``where`` with ``plan`` = (slots, max_len): the rows in slots go back
        to ``window`` and the state is released, to be rebuilt with half the slots (after a prefill, half
        the prefill group too). One slot: its row ends in error; a KV cache of one slot that does not fit
        raises. Returns the new (empty) slot owners."""
        slots, max_len = plan
        running = [o for o in owner if o is not None]
        self._release()
        if slots <= 1:
            if not running:
                import torch

                need = max_len * kv_bytes_per_token(self.model, self.dtype)
                free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else 0
                raise RuntimeError(
                    f"out of GPU memory for the fast engine's KV cache even with one slot: {max_len} tokens need "
                    f"{need / 2**20:.0f} MiB ({free / 2**20:.0f} MiB free on {self.device}); give the rows fewer "
                    f"max_new_tokens or shorter prompts (max_prompt_tokens), or run on a GPU with more memory")
            for tag, request, _ in running:
                self.oom_errors += 1
                tokens = len(request.input_ids) + request.max_new_tokens
                log.warning("one row does not fit in GPU memory (%d tokens in one slot); marked as error", tokens)
                self._early.append((tag, Completion(None, 0, "error", f"out of GPU memory for {tokens} tokens")))
            return []
        self.oom_splits += 1
        self.max_slots = slots // 2
        if prefill:
            self.prefill_tokens = max(1, self.prefill_tokens // 2)
        for item in running:  # they restart from their prompt: the same tokens, their samples are keyed
            window.append(item)
            self._enqueue(item)
        log.warning("CUDA out of memory in %s with %d slots: %d running rows go back to the queue; continuing "
                    "with %d slots, prefill groups of up to %d tokens (batch_size=%d would start there)",
                    where, slots, len(running), self.max_slots, self.prefill_tokens, self.max_slots)
        return []

    def _enqueue(self, item: tuple[Any, Request, Any]) -> None:
        """Called as an item enters the window (the vision engine starts decoding its images)."""

    def _take_early(self) -> list[tuple[Any, Completion]]:
        early, self._early = self._early, []
        return early

    def _fits(self, request: Request) -> bool:
        return len(request.input_ids) + request.max_new_tokens <= self._shape[1]

    def _admit_waiting(self, window: list, owner: list, seed: int) -> None:
        """Prefill waiting rows into free slots, group by group."""
        while True:
            free = [s for s, o in enumerate(owner) if o is None]
            group = self._next_group(window, len(free)) if free else []
            if not group:
                return
            taken = free[:len(group)]
            for slot, item in zip(taken, group):
                owner[slot] = item
            admitted = {id(item) for item in group}
            window[:] = [x for x in window if id(x) not in admitted]
            for item in group:  # requeued after an out-of-memory error, it goes first (block 0)
                self._block.pop(id(item), None)
            self._admit([r for _, r, _ in group], taken, [row_seed(seed, key) for _, _, key in group])

    def _next_group(self, window: list, free: int) -> list:
        """The next prefill group: the longest waiting prompts that fit, of the oldest arrival block, within
        ``prefill_tokens``. Rows that :meth:`_row_ready` drops (vision: an image that failed) leave the
        window meanwhile."""
        while True:
            ready = sorted((x for x in window if self._fits(x[1])),
                           key=lambda x: (self._block.get(id(x), 0), -len(x[1].input_ids)))[:free]
            group, width = [], 0
            for item in ready:
                if not self._row_ready(item, window):
                    continue
                new_width = max(width, len(item[1].input_ids))
                if group and new_width * (len(group) + 1) > self.prefill_tokens:
                    break
                group.append(item)
                width = new_width
            if group or not ready:
                return group

    def _row_ready(self, item: tuple[Any, Request, Any], window: list) -> bool:
        """Whether ``item`` can be prefilled (the vision engine waits for its images here, and drops it
        from ``window`` with an error when they fail)."""
        return True

    def stats(self) -> dict:
        """Where the time went (host-side seconds), for the manifest."""
        return {"prefill_seconds": round(self.prefill_seconds, 3), "capture_seconds": round(self.capture_seconds, 3),
                "decode_steps": self.steps, "slots": self._shape[0] if self._shape else None,
                "oom_splits": self.oom_splits, "oom_errors": self.oom_errors}

    def _padded_ids(self, group: list[Request]):
        """The group's prompt ids [n, W], right-padded, on the device."""
        return right_padded([r.input_ids for r in group]).to(self.device)

    def _inputs(self, group: list[Request]):
        """(ids [n, W] right-padded, embeddings [n, W, D], positions [n, W] or [3, n, W], rope offsets [n]
        or ``None``) of a prefill group, on the device."""
        import torch

        ids = self._padded_ids(group)
        positions = torch.arange(ids.shape[1], device=self.device).expand(*ids.shape)
        return ids, self.base.embed_tokens(ids), positions, None

    def _admit(self, group: list[Request], slot_list: list[int], seeds: list[int]) -> None:
        import torch

        dev = self.device
        started = time.monotonic()
        with prefill_attention():  # the vision tower and the decoder
            ids, x, positions, offsets = self._inputs(group)
            n, width = ids.shape
            lengths = torch.tensor([len(r.input_ids) for r in group], device=dev)
            slot_idx = torch.tensor(slot_list, device=dev)
            seeds_t = torch.tensor(seeds, dtype=torch.long, device=dev)
            max_new = torch.tensor([r.max_new_tokens for r in group], device=dev)
            presence = None
            if self.presence is not None:
                self.presence[slot_idx] = False
                valid = torch.arange(width, device=dev)[None, :] < lengths[:, None]
                rows = torch.arange(n, device=dev)[:, None].expand(n, width)
                presence = self.presence
                presence[slot_idx[rows[valid]], ids[valid]] = True
                presence = presence[slot_idx]
            logits = self._prefill(x, positions, lengths, slot_idx)
        first = self._pick(logits, seeds_t, torch.zeros(n, dtype=torch.long, device=dev), None, presence)
        if self.presence is not None:
            self.presence[slot_idx, first] = True
        if self.counts is not None:  # the first token was drawn before the row had generated anything
            self.counts[slot_idx] = 0
            self.counts[slot_idx, first] = 1
        self.tokens[slot_idx] = first
        self.pos[slot_idx] = lengths
        self.rope_offset[slot_idx] = 0 if offsets is None else offsets
        self.n_gen[slot_idx] = 1
        self.max_new[slot_idx] = max_new
        self.seeds[slot_idx] = seeds_t
        self.out[slot_idx, 0] = first
        self.done[slot_idx] = torch.isin(first, self.eos_tensor) | (max_new <= 1)
        # No sync: the host prepares the next group while the GPU runs this one (seconds are host-side).
        self.prefill_seconds += time.monotonic() - started

    def _harvest(self, owner: list) -> Iterator[tuple[Any, Completion]]:
        done = self.done.tolist()  # the one host sync per replay
        finished = [s for s, o in enumerate(owner) if o is not None and done[s]]
        if not finished:
            return
        counts = self.n_gen[finished].tolist()
        rows = self.out[finished].tolist()
        completions = []
        for s, n, row in zip(finished, counts, rows):
            tag, request, _ = owner[s]
            owner[s] = None
            completions.append((tag, self._completion(row[:n], request.max_new_tokens)))
        self.on_batch(len(finished), sum(c.output_tokens for _, c in completions))
        yield from completions

    def _completion(self, ids: list[int], max_new_tokens: int) -> Completion:
        finish = "length"
        if ids and ids[-1] in self.eos:
            ids, finish = ids[:-1], "stop"
        text = self.loaded.tokenizer.decode(ids, skip_special_tokens=True)
        text, finish = cut_at_stop(text, finish, self.params.stop)
        return Completion(text, len(ids), finish)
