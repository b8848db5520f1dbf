"""``torch.compile`` around attention (issue 17): the elementwise work of a decode step and a prefill
(RMSNorm in fp32 and its casts, rotary with its ``rotate_half`` concatenation, residual adds, SiLU times
up, FP8's per-token activation scaling) fused into few Triton kernels, the GEMMs left to cuBLAS.

Each decoder layer runs as two compiled pieces around the caller's KV write and attention (SDPA in
prefill, the Triton kernel in decode), which stay eager: :func:`~airflow_hfllm.engine.arch.layer.before_attention`
(norm, projection, q/k norms, rope) and :func:`~airflow_hfllm.engine.arch.layer.after_attention` (o_proj,
residual, norms, MLP, residual). The rope tables and the final norm + ``lm_head`` (+ soft-capping) are
compiled too. Compiled with ``dynamic=True``, in inductor's default mode (no cudagraphs of its own: the
fast engine captures whole decode steps itself, compiled pieces included, after a warm-up step that
compiles them).

One compiled function serves every layer: the layer's modules are an argument, and dynamo inlines
``nn.Module`` calls and lifts their parameters as graph inputs (``inline_inbuilt_nn_modules``, always on
in torch 2.13), so its guards check the layer's structure (module types, which attributes it has, the
fused projections' split sizes), not which layer it is. Graphs are made per shape class, not per shape or
layer: a decode step (T = 1), prefill groups (n, T >= 2) and a prefill group of one row (dynamic
dimensions are specialised at 0 and 1), for each model in the process. A function's graphs are counted
per code object, which every model and engine of the process shares, so :data:`RECOMPILE_LIMIT` raises
torch's limit of 8 (past it dynamo would run the function eagerly from then on, only logging it). The
head counts and size are read from the attention module (``DIMS``), not passed: ``dynamic=True`` makes
a compiled function's int arguments and closure ints symbolic, and its kernels generic in them.

A failure to compile (at the first call of a shape class, as a real one happens: no C++ compiler, an
op inductor cannot lower) turns every function of its :class:`Compiler` eager, with one warning. The
functions compiled are pure (the KV write is outside them), so the failed call just runs again eagerly.
CUDA running out of memory is not a compile failure: it goes to the engine's own recovery. The Llama
Guard checker's lean verdict pass (``safety/verdict_pass.py``) compiles through a :class:`Compiler` too.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)

# Whether the fast engine compiles its layers when the caller leaves ``compile`` unset (on CUDA only):
# off until measured on the GPU (benchmarks/throughput.py --paths ours,ours-compiled)
COMPILE_DEFAULT = False
# Graphs one compiled function may hold (torch's default 8): a few shape classes per model, shared by every
# model compiled in the process (tests build many); past the limit dynamo silently runs it eagerly
RECOMPILE_LIMIT = 64


# A job compiles its fast engine (on CUDA, text) when it will generate at least this many tokens: on an H200
# the 7B standard batch ran 12,776 -> 15,708 output tok/s compiled, and compiling took 25 s (inductor's cache
# cold), repaid after ~1.7M output tokens (docs/benchmarks.md)
COMPILE_MIN_TOKENS = 2_000_000


def compile_by_default(device) -> bool:
    """Whether a fast engine on ``device`` compiles when its ``compile`` option is unset."""
    return COMPILE_DEFAULT and device.type == "cuda"


def layer_pieces(compiler: "Compiler", layers, dims: tuple[int, int, int]):
    """``before_attention`` and ``after_attention`` compiled by ``compiler``, one function each for all of
    ``layers``, as :func:`~airflow_hfllm.engine.arch.layer.decoder_layer`'s ``pieces``. The layers' dims go
    on their attention modules (``DIMS``) and are read there: the ``dims`` argument, unused, stays out of the
    graph."""
    from airflow_hfllm.engine.arch.layer import DIMS, after_attention, before_attention

    for layer in layers:
        setattr(layer.self_attn, DIMS, dims)

    def before(layer, x, cos, sin, dims):
        return before_attention(layer, x, cos, sin, getattr(layer.self_attn, DIMS))

    def after(layer, x, o, dims):
        return after_attention(layer, x, o, getattr(layer.self_attn, DIMS))

    return compiler(before), compiler(after)


def compile_failed(name: str, exc: BaseException) -> None:
    """The one warning of a compile that failed."""
    log.warning("%s: torch.compile failed (%s: %s); running eager", name, type(exc).__name__, str(exc)[:200])


class Compiler:
    """Compiles functions (``torch.compile(fn, dynamic=True)``) that fall back to eager together.

    ``compiler(fn)`` returns ``fn`` compiled (``fn`` itself when the compiler is off): called with
    positional arguments, it runs the compiled code while the compiler is :attr:`enabled`; a call that
    raises turns the compiler off (:func:`compile_failed`, once) and runs ``fn`` eagerly, then and from then
    on. :attr:`seconds` adds up the calls that compiled (a new shape class).
    """

    def __init__(self, name: str, enabled: bool = True):
        self.name, self.enabled, self.seconds = name, enabled, 0.0

    def __call__(self, fn):
        if not self.enabled:
            return fn
        import torch

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        compiled = torch.compile(fn, dynamic=True)

        def run(*args):
            if not self.enabled:
                return fn(*args)
            frames, started = _frames(), time.monotonic()
            try:
                out = compiled(*args)
            except Exception as exc:
                oom = _out_of_memory(exc)
                if oom is not None:
                    raise oom
                self.fail(exc)
                return fn(*args)
            if _frames() != frames:  # dynamo compiled a frame in this call
                self.seconds += time.monotonic() - started
            return out

        run.__wrapped__ = fn
        return run

    def fail(self, exc: BaseException) -> None:
        if self.enabled:
            self.enabled = False
            compile_failed(self.name, exc)


def _frames() -> int:
    from torch._dynamo.utils import counters

    return counters["frames"]["total"]


def _out_of_memory(exc: BaseException):
    """The CUDA out-of-memory error ``exc`` is or was raised from (dynamo wraps what a compile raised)."""
    import torch

    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, torch.OutOfMemoryError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
