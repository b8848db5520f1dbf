"""How the fast engine (``engine/fast.py``) runs its decode steps: parts of a step captured as CUDA graphs
(:class:`Captured`), and a constrained job's step (:func:`grammar_step`), where the host's mask work
overlaps the GPU's forward pass.

A grammar's mask for step n needs each row's token n-1 on the host, so a constrained job decodes one step
per sync. Run whole, the step leaves the GPU idle while the host advances the matchers and computes the
masks (llguidance, on its executor's threads). But only the sampling reads the masks, and the forward
pass's input (token n-1) is already on the device; so overlapped (``FastEngine(grammar_overlap=True)``, the
default on CUDA) a step is two graphs:

1. tokens n-1 and ``done`` are copied to pinned host memory (no sync), and the forward graph is launched;
2. the host waits for that copy only (the forward runs on), advances the matchers with the tokens (a
   prefilled row's first token among them), marks complete rows done, fills mask n into pinned memory and
   copies it to the device, asynchronously and on the same stream: after the forward pass and before
3. the sampling graph: the draw under mask n and the step's bookkeeping.

A row whose grammar completes with token n-1 is found so during step n: its slot idles that step (the row
draws nothing more) and its replacement comes a step later. In series (``grammar_overlap=False``, the
CPU's default, where every op is synchronous anyway) the order is the one before the split: the whole
step as one graph, then its host work, and a prefill group's first tokens consumed at once. Both draw the
same tokens. The host's seconds of mask work and of waiting on the GPU are counted
(``grammar_mask_seconds``, ``grammar_wait_seconds`` in :meth:`FastEngine.stats
<airflow_hfllm.engine.fast.FastEngine.stats>`).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

log = logging.getLogger(__name__)


class Captured:
    """``parts`` of a decode step as CUDA graphs, each fed the previous part's output (``None`` for the first;
    kept alive here, in the graphs' memory), replayed one by one with ``captured(i)``.

    ``warm_up`` runs first, on a side stream (lazy inits and autotuning outside the graph). It is a real
    step, so the state it moved is put back (the penalties' tensors too, or they would count twice). The
    graphs share one memory pool, as one graph's steps would (they replay in the order captured).
    """

    def __init__(self, engine, warm_up: Callable[[], None], *parts: Callable):
        import torch

        # The prefills queued before: not this capture's time (torch.cuda.graph waits for them anyway).
        torch.cuda.synchronize(engine.device)
        started, compiled = time.monotonic(), engine.decoder.compiler.seconds  # the warm-up step compiles
        state = [t for t in (engine.tokens, engine.pos, engine.n_gen, engine.done, engine.out, engine.presence,
                             engine.counts) if t is not None]
        saved = [t.clone() for t in state]
        current = torch.cuda.current_stream(engine.device)
        stream = torch.cuda.Stream(engine.device)
        stream.wait_stream(current)  # after the clones: the warm-up must not move the state under them
        with torch.cuda.stream(stream), torch.inference_mode():
            warm_up()
        current.wait_stream(stream)
        torch.cuda.synchronize(engine.device)
        warmed = time.monotonic()
        self.graphs, self.outputs, out = [], [], None
        for part in parts:
            graph, pool = torch.cuda.CUDAGraph(), self.graphs[0].pool() if self.graphs else None
            with torch.inference_mode(), torch.cuda.graph(graph, pool=pool):
                out = part(out)
            self.graphs.append(graph)
            self.outputs.append(out)
        for t, s in zip(state, saved):
            t.copy_(s)
        engine.capture_seconds += time.monotonic() - started - (engine.decoder.compiler.seconds - compiled)
        log.info("fast engine: captured %d CUDA graph(s) of decode steps in %.2f s after a warm-up step of %.2f s "
                 "(first kernel launches, autotuning)", len(parts), time.monotonic() - warmed, warmed - started)

    def __call__(self, part: int) -> None:
        self.graphs[part].replay()


def grammar_step(engine) -> None:
    """One constrained decode step of ``engine`` (a :class:`~airflow_hfllm.engine.fast.FastEngine`), with
    its grammar's host work: see the module docstring."""
    import torch

    c = engine.constraint
    parts = (engine._forward, engine._sampled) if c.overlap else (lambda _: engine._steps(1),)
    if engine.cuda_graphs and engine._graph is None:
        engine._graph = Captured(engine, lambda: engine._steps(1), *parts)
    if engine.cuda_graphs:
        run = engine._graph
    else:
        outputs = [None]

        def run(part: int) -> None:
            with torch.inference_mode():
                outputs.append(parts[part](outputs[-1]))

    if c.overlap:
        c.read(engine.tokens, engine.done, engine.n_gen)
        run(0)  # the forward pass: its input is on the device already
        c.catch_up(engine.done)  # waits for the read only, then the matchers and the masks
        run(1)  # the draw under the new masks
        c.wait()
    else:  # the step whole, then its host work, which waits for it
        run(0)
        c.read(engine.tokens, engine.done, engine.n_gen)
        c.catch_up(engine.done)
