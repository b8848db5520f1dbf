"""Constrained outputs: a JSON schema, a regular expression or a fixed set of choices, through llguidance.

llguidance (MIT, a 3 MB abi3 wheel with no dependencies) compiles all three into one kind of grammar and
computes a row's allowed next tokens as a bitmask of ``ceil(vocab / 32)`` int32 words in microseconds
(transformers and vLLM use it too). :func:`compile_grammar` builds the grammar once per job from the
parameters (it is also the up-front check, with no model loaded); :class:`Constraint` binds it to a
tokenizer and gives one matcher per row. The engines mask each step's logits with :func:`apply_mask`
before sampling, advance the matchers with the sampled tokens on the host, and end a row as soon as its
grammar is complete (without waiting for EOS, which is allowed only once the grammar accepts). On the fast
engine the host's share of a step is :meth:`Constraint.read` and :meth:`Constraint.catch_up`, which
``engine/steps.py`` runs during the step's forward pass on a GPU.

A row cut by ``max_new_tokens`` before its grammar completed keeps its text but gets ``finish_reason``
``"length"`` and an error (:meth:`Constraint.judge`): it is never written as valid.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from typing import Sequence

from airflow_hfllm.engine.arch.layer import upload
from airflow_hfllm.engine.generate import Completion

CUT = "output cut at max_new_tokens before the grammar completed"
STOPPED = "output ended (stop string) before the grammar completed"
REJECTED = "the grammar rejected the output"
# Compact JSON: flexible whitespace lets a weak model spend its tokens on spaces and newlines.
JSON_OPTIONS = {"whitespace_flexible": False}


def load_schema(value) -> dict:
    """A JSON schema given as a dict, JSON text, or a path or fsspec URL of a JSON file."""
    if isinstance(value, dict):
        return value
    text = value.strip()
    if not text.startswith("{"):
        import fsspec

        try:
            with fsspec.open(text, "r", encoding="utf-8") as f:
                text = f.read()
        except (OSError, ValueError) as exc:
            raise ValueError(f"json_schema: cannot read {value!r}: {exc}") from None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"json_schema is not JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"json_schema must be a JSON object, got {schema!r}")
    return schema


def checked(json_schema, regex, choices) -> dict:
    """The job's constraint parameters as :class:`~airflow_hfllm.config.GenerationParams` keeps them (a schema
    read, choices split at commas), once checked: at most one set, and it compiles. A ``ValueError`` names
    the parameter, before any model loads."""
    if isinstance(choices, str):
        choices = [c.strip() for c in choices.split(",")]
    choices = tuple(choices) if choices else None
    if json_schema is not None:
        json_schema = load_schema(json_schema)
    given = [name for name, value in (("json_schema", json_schema), ("regex", regex), ("choices", choices))
             if value is not None]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} are set together: a job takes at most one of json_schema, regex "
                         "and choices")
    if choices and not all(isinstance(c, str) and c for c in choices):
        raise ValueError(f"choices must be non-empty strings, got {list(choices)}")
    compile_grammar(json_schema, regex, choices)
    return {"json_schema": json_schema, "regex": regex, "choices": choices}


def compile_grammar(json_schema: dict | None = None, regex: str | None = None,
                    choices: Sequence[str] | None = None) -> str | None:
    """The llguidance grammar of whichever parameter is set (``None`` when none is); a ``ValueError`` naming
    the parameter when the schema or the regex is invalid."""
    if json_schema is None and regex is None and not choices:
        return None  # llguidance is imported by constrained jobs only
    from llguidance import LLMatcher

    if json_schema is not None:
        name, grammar = "json_schema", LLMatcher.grammar_from_json_schema(json_schema, overrides=JSON_OPTIONS)
    elif regex is not None:
        name, grammar = "regex", LLMatcher.grammar_from_regex(regex)
    else:
        # a Lark alternation of string literals (JSON's escapes are Lark's), as llguidance's grammar_from does
        name, grammar = "choices", LLMatcher.grammar_from_lark("start: " + " | ".join(map(json.dumps, choices)))
    problem = LLMatcher.validate_grammar(grammar)
    if problem:
        raise ValueError(f"{name} is invalid: {problem.strip()}")
    return grammar


def constraint(params, tokenizer, model, eos: list[int]) -> "Constraint | None":
    """The job's constraint for an engine (``None`` when the job has none: the engines change nothing), for
    ``model``'s vocabulary (or that many tokens)."""
    grammar = compile_grammar(params.json_schema, params.regex, params.choices)
    if grammar is None:
        return None
    vocab = model if isinstance(model, int) else model.config.get_text_config().vocab_size
    return Constraint(grammar, tokenizer, vocab, eos)


class Constraint:
    """A compiled grammar bound to a tokenizer; matchers for a batch's rows (or a fast engine's slots) and
    their next-token bitmask ``mask`` [rows, words] (host, int32), filled by :meth:`fill`.

    ``overlap``: the fast engine computes a step's masks while the GPU runs its forward pass (two graphs a
    step, ``engine/steps.py``; the engine's default on CUDA); ``False``: in series, after it."""

    overlap = False

    def __init__(self, grammar: str, tokenizer, vocab: int, eos: list[int]):
        import llguidance.hf

        self.grammar, self.vocab, self.eos = grammar, vocab, set(eos)
        # the model's vocabulary may be padded past the tokenizer's: those ids are never allowed
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=max(vocab, len(tokenizer)),
                                                      eos_token=list(eos) or None)
        self.words = (self.tokenizer.vocab_size + 31) // 32
        self.matchers: list = []
        self.originals: list = []  # one a row or slot: see matcher()
        self.consumed: list[int] = []  # the fast engine's: each slot's tokens its matcher consumed
        self.mask = self.device_mask = None
        # the fast engine's host time (engine/steps.py); consuming tokens is a part of the mask work
        self.mask_seconds = self.wait_seconds = self.consume_seconds = 0.0

    def allocate(self, slots: int, device):
        """The fast engine's masks: ``mask`` on the host (pinned on CUDA, for an asynchronous copy) and the
        device buffer [slots, words] returned, which its decode step reads (a CUDA graph holds it)."""
        import torch

        cuda = device.type == "cuda"
        host = torch.full((slots, self.words), -1, dtype=torch.int32, pin_memory=cuda)
        self.matchers, self.mask, self.active = [None] * slots, host.numpy(), set()
        self.host, self.device_mask = host, torch.full_like(host, -1, device=device)
        # each slot's last token, done flag and tokens generated, read without a sync (engine/steps.py); a
        # matcher consumes a slot's token only when its count moved (a LongRoPE row can sit out a step)
        self.last = torch.zeros((3, slots), dtype=torch.long, pin_memory=cuda)
        self.consumed = [0] * slots
        self.event = torch.cuda.Event() if cuda else None
        return self.device_mask

    def admitted(self, slots: Sequence[int], tokens, done, counts) -> None:
        """Fast engine, after a prefill drew the first tokens of ``slots`` (in ``tokens`` [slots]) under the
        masks :meth:`start` filled. Overlapped, the matchers consume them in the next step's :meth:`catch_up`
        with the others' tokens; in series, now (a host sync)."""
        self.active.update(slots)
        if not self.overlap:
            self.read(tokens, done, counts)
            self.catch_up(done, slots)

    def read(self, tokens, done, counts) -> None:
        """Fast engine: each slot's last token (``tokens`` [slots]), ``done`` and tokens generated (``counts``)
        copied to the host, on CUDA asynchronously (what is launched after this does not delay it)."""
        import torch

        self.last.copy_(torch.stack([tokens, done.long(), counts]), non_blocking=True)
        if self.event is not None:
            self.event.record()

    def catch_up(self, done, slots: Sequence[int] | None = None) -> None:
        """Fast engine, once :meth:`read` has landed: the matchers of ``slots`` (default: the active ones)
        advanced with their tokens, the rows whose grammar is complete ended in ``done``, the next masks filled
        and copied to the device; nothing here waits for the GPU but the read, and nothing is written to the
        device synchronously."""
        import torch

        started = time.monotonic()
        if self.event is not None:
            self.event.synchronize()
        self.wait_seconds += time.monotonic() - started
        started = time.monotonic()
        tokens, stopped, counts = self.last.tolist()
        slots = [s for s in sorted(self.active if slots is None else slots) if counts[s] > self.consumed[s]]
        for s in slots:
            self.consumed[s] = counts[s]
        consumed = time.monotonic()
        ended = [s for s, e in zip(slots, self.advance(slots, [tokens[s] for s in slots])) if e]
        self.consume_seconds += time.monotonic() - consumed
        if ended:  # from pinned memory: a plain index would copy from pageable memory, with a sync
            cuda = done.device.type == "cuda"
            done.index_fill_(0, torch.tensor(ended, pin_memory=cuda).to(done.device, non_blocking=cuda), True)
        self.active.difference_update([*ended, *(s for s in slots if stopped[s])])
        self.fill(sorted(self.active))
        self.device_mask.copy_(self.host, non_blocking=True)
        self.mask_seconds += time.monotonic() - started

    def wait(self) -> None:
        """Fast engine, after a step's last launch: the host waits for the GPU (counted in ``wait_seconds``)."""
        if self.event is not None:
            started = time.monotonic()
            self.event.record()
            self.event.synchronize()
            self.wait_seconds += time.monotonic() - started

    def stats(self) -> dict:
        """The fast engine's host seconds of mask work (matchers, masks, copies) and of waiting on the GPU."""
        return {"grammar_mask_seconds": round(self.mask_seconds, 3),
                "grammar_consume_seconds": round(self.consume_seconds, 3),
                "grammar_wait_seconds": round(self.wait_seconds, 3)}

    def matcher(self, row: int):
        """A fresh matcher for row (or slot) ``row``: a copy of that row's original (:meth:`build`).
        llguidance's copies share their original's lexer behind one lock, so rows copied from one original
        computed their masks one at a time however many threads ran them (H200 host, 16 cores, 512 rows: 115
        us a row and step; one original a row: 13.8)."""
        self.build(row + 1)
        return self.originals[row].deep_copy()

    def build(self, rows: int) -> None:
        """Originals for rows ``0..rows-1``, the missing ones built on threads (building one compiles the
        grammar, 1.7 ms on the H200's host, without the GIL: 512 in series held the first prefill 0.8 s)."""
        from concurrent.futures import ThreadPoolExecutor

        from llguidance import LLMatcher

        missing = rows - len(self.originals)
        if missing > 0:
            with ThreadPoolExecutor(min(missing, os.cpu_count() or 1)) as pool:
                self.originals += pool.map(lambda _: LLMatcher(self.tokenizer, self.grammar, log_level=0),
                                           range(missing))

    def reset(self, rows: int) -> None:
        """``rows`` rows, none started."""
        import numpy as np

        self.matchers = [None] * rows
        self.mask = np.full((rows, self.words), -1, dtype=np.int32)
        self.device_mask = None

    def start(self, rows: Sequence[int], device=None):
        """Fresh matchers for ``rows``, their masks filled for their first token; on the fast engine (given
        the ``device``) those rows' masks returned there, copied from their own pinned memory on CUDA (the
        shared buffer may be rewritten before the copy runs)."""
        import torch

        started = time.monotonic()
        self.build(max(rows, default=-1) + 1)
        for r in rows:
            self.matchers[r] = self.matcher(r)
            if self.consumed:
                self.consumed[r] = 0
        self.fill(rows)
        self.mask_seconds += time.monotonic() - started
        if device is not None:
            return upload(torch.from_numpy(self.mask[list(rows)]), device)

    def fill(self, rows: Sequence[int]) -> None:
        """The allowed next tokens of ``rows`` into ``mask``; a row whose matcher failed may take any token
        (its output is judged afterwards, and a row of all -inf logits would sample garbage anyway)."""
        import llguidance.numpy as lnp

        live = []
        for r in rows:
            m = self.matchers[r]
            if m is None or m.is_error() or m.is_stopped():
                self.mask[r] = -1
            else:
                live.append((m, r))
        if live:  # on the executor's threads (most of a step's host work with hundreds of slots)
            lnp.fill_next_token_bitmask_par(self.executor(), live, self.mask)

    def advance(self, rows: Sequence[int], tokens: Sequence[int]) -> list[bool]:
        """Each row's sampled token consumed (on the executor's threads); whether its grammar is now complete
        (or failed: the row ends)."""
        matchers = [self.matchers[r] for r in rows]
        live = [(m, t) for m, t in zip(matchers, tokens) if not (m.is_stopped() or m.is_error())]
        if live:
            self.executor().consume_token_par(live)
        return [m.is_stopped() or m.is_error() for m in matchers]

    def executor(self):
        """llguidance's thread pool (its threads run without the GIL)."""
        import llguidance

        self._executor = getattr(self, "_executor", None) or llguidance.LLExecutor()
        return self._executor

    def judge(self, finished: Sequence[tuple[Completion, Sequence[int]]]) -> list[Completion]:
        """Each finished row with its finish reason and error from its output tokens (without EOS), replayed on
        fresh matchers, a token position at a time for all rows in parallel: a row's own ``max_new_tokens`` may
        have cut it after the engine's matcher saw more tokens. (One row after another, at ~23 us a token on the
        CPU, replaying 512 rows of 128 tokens would hold the GPU ~1.5 s.)"""
        rows = [i for i, (done, _) in enumerate(finished) if done.finish_reason != "error"]
        self.build(len(finished))
        matchers = {i: self.matcher(i) for i in rows}
        tokens = {i: [t for t in finished[i][1] if t not in self.eos] for i in rows}
        rejected = set()
        for k in range(max((len(tokens[i]) for i in rows), default=0)):
            batch = [i for i in rows if k < len(tokens[i]) and i not in rejected]
            if batch:
                ok = self.executor().consume_token_par([(matchers[i], tokens[i][k]) for i in batch])
                rejected.update(i for i, good in zip(batch, ok) if not good)
        judged = [done for done, _ in finished]
        for i in rows:
            done, m = judged[i], matchers[i]
            if i in rejected:
                judged[i] = replace(done, error=REJECTED)
            elif m.is_stopped() or (m.is_accepting() and done.finish_reason == "stop"):
                judged[i] = replace(done, finish_reason="stop", error=None)
            elif not m.is_accepting():  # accepting: valid, though it could have gone on
                judged[i] = replace(done, error=CUT if done.finish_reason == "length" else STOPPED)
        return judged


def judged(constraint: Constraint | None, finished: Sequence[tuple[Completion, Sequence[int]]]) -> list[Completion]:
    """The ``finished`` rows (each a completion and its output tokens) as :meth:`Constraint.judge` sees them,
    or as they are when the job has no constraint."""
    return [done for done, _ in finished] if constraint is None else constraint.judge(finished)


def apply_mask(logits, mask):
    """``logits`` [n, V] with -inf where the bitmask ``mask`` [n, words] (int32, a device tensor) has a 0 bit;
    static shapes and no host sync, so a CUDA graph can hold it."""
    import torch

    # bytes, not int32 words, unpacked: a quarter of the memory (~78 MB a step at 512 slots of a 152k vocabulary);
    # little-endian, so token t is bit t % 8 of byte t // 8
    shifts = torch.arange(8, device=mask.device, dtype=torch.uint8)
    bits = ((mask.contiguous().view(torch.uint8)[:, :, None] >> shifts) & 1).reshape(mask.shape[0], -1)
    return logits.masked_fill(bits[:, :logits.shape[-1]] == 0, float("-inf"))


def generate_hooks(constraint: Constraint, kwargs: dict) -> dict:
    """``generate()`` arguments ``kwargs`` plus the constraint for one batch: a logits processor masking
    each row (after the penalties, before temperature, top-k and top-p) and a stopping criterion that
    advances each row's matcher with its new token and ends the rows whose grammar is complete. Rows are
    ``generate()``'s own (left padding does not matter: only each row's last token is read)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

    class Mask(LogitsProcessor):
        started = False

        def __call__(self, input_ids, scores):
            rows = range(input_ids.shape[0])
            if not self.started:
                constraint.reset(len(rows))
                constraint.start(rows)
                self.started = True
            else:
                constraint.fill(rows)
            return apply_mask(scores, torch.from_numpy(constraint.mask).to(scores.device))

    class Complete(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            ended = constraint.advance(range(input_ids.shape[0]), input_ids[:, -1].tolist())
            return torch.tensor(ended, dtype=torch.bool, device=input_ids.device)

    return {**kwargs, "logits_processor": LogitsProcessorList([*kwargs.get("logits_processor", []), Mask()]),
            "stopping_criteria": StoppingCriteriaList([*kwargs.get("stopping_criteria", []), Complete()])}
