"""The fast engine with ``compile=True`` (engine/compiled.py) on the CPU, through inductor's C++ backend:
greedy tokens equal the eager engine's for a tiny Llama and a tiny Gemma 3 (q/k norms, sandwich norms, two
rope tables, soft-capping); one graph per piece and shape class whatever the number of layers, nothing
compiled again for other prompt lengths; a compile failure runs eager with one warning, and running out
of memory is not one. Inductor is set to compile fast here (in process, scalar C++): the test checks what
is compiled and what it computes, not the CPU's SIMD code, in about a minute on 2 cores."""

import logging

import pytest

from airflow_hfllm.config import GenerationParams, ModelSpec
from airflow_hfllm.engine.fast import FastEngine
from airflow_hfllm.engine.loading import get_model
from airflow_hfllm.testing.families import make_family_model
from tests.conftest import chat_requests, failing_compile

torch = pytest.importorskip("torch")

ROWS, NEW = 6, 16
FAILED = "torch.compile failed (RuntimeError: inductor: no C++ compiler); running eager"


def graphs(piece) -> int:
    """Graphs dynamo holds for a compiled piece's code (shared by every decoder of the process)."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(piece.__wrapped__.__code__))


@pytest.mark.parametrize("family", ["llama", "gemma3-text"])
def test_compiled_engine_gives_the_eager_tokens(tmp_path, quick_inductor, family):
    from torch._dynamo.utils import counters

    loaded = get_model(ModelSpec(str(make_family_model(tmp_path / family, family))))
    requests = chat_requests(loaded.tokenizer, ROWS, NEW)
    params = GenerationParams(max_new_tokens=NEW, do_sample=False)
    # as many slots as rows: one prefill group, then decode steps (two shape classes, n >= 2)
    eager = FastEngine(loaded, params, slots=ROWS, steps_per_sync=3).generate(requests)
    engine = FastEngine(loaded, params, slots=ROWS, steps_per_sync=3, compile=True)
    pieces = engine.decoder.pieces
    held = [graphs(p) for p in pieces]
    compiled = engine.generate(requests)
    assert engine.decoder.compiler.enabled and engine.stats()["compile_seconds"] > 0
    assert [c.text for c in compiled] == [c.text for c in eager]
    # before and after attention: a prefill graph and a decode graph each, shared by the layers (gemma: 4)
    assert [graphs(p) - h for p, h in zip(pieces, held)] == [2, 2]
    frames = counters["frames"]["total"]
    again = engine.generate(requests[:4])  # fewer rows, other lengths: dynamic shapes, nothing compiles
    assert counters["frames"]["total"] == frames
    assert [c.text for c in again] == [c.text for c in eager[:4]]
    # a paged cache: the writes and reads around the compiled pieces change, the pieces do not
    paged = FastEngine(loaded, params, slots=ROWS, steps_per_sync=3, compile=True, paged=True)
    assert [c.text for c in paged.generate(requests)] == [c.text for c in eager] and paged.table is not None


def test_a_compile_failure_runs_eager_with_one_warning(loaded, monkeypatch, caplog):
    calls = []
    broken_compile = failing_compile(calls)
    requests = chat_requests(loaded.tokenizer, 8, 12)
    params = GenerationParams(max_new_tokens=12, do_sample=False)
    eager = FastEngine(loaded, params, slots=4, steps_per_sync=3).generate(requests)
    assert FastEngine(loaded, params).decoder.pieces is None  # the default, for now: eager
    monkeypatch.setattr(torch, "compile", broken_compile)
    engine = FastEngine(loaded, params, slots=4, steps_per_sync=3, compile=True)
    with caplog.at_level(logging.WARNING):
        got = engine.generate(requests)
    assert [c.text for c in got] == [c.text for c in eager]
    assert len(calls) == 1 and not engine.decoder.compiler.enabled  # every piece eager after the first failure
    assert caplog.text.count(FAILED) == 1 and "fast engine (" in caplog.text


def test_running_out_of_memory_is_not_a_compile_failure(monkeypatch):
    from airflow_hfllm.engine.compiled import Compiler

    def compile_out_of_memory(fn, **kwargs):
        def run(*args):
            try:
                raise torch.OutOfMemoryError("CUDA out of memory (autotuning)")
            except torch.OutOfMemoryError as exc:
                raise RuntimeError("backend compiler failed") from exc  # as dynamo wraps what inductor raised
        return run

    monkeypatch.setattr(torch, "compile", compile_out_of_memory)
    compiler = Compiler("test")
    add = compiler(lambda x: x + 1)
    with pytest.raises(torch.OutOfMemoryError):  # to the engine's recovery, which catches exactly this
        add(torch.ones(1))
    assert compiler.enabled


def test_the_job_option_reaches_the_engine(loaded):
    """``compile`` on / off reach the fast engine; auto compiles only GPU text jobs of at least
    COMPILE_MIN_TOKENS output tokens (so not this CPU job, however long)."""
    from airflow_hfllm.config import JobConfig
    from airflow_hfllm.run import engines
    from airflow_hfllm.run.kinds import TextKind

    def compiled(value: str, tokens: int = 0) -> bool:
        driver = engines.choose(TextKind(), loaded, GenerationParams(), JobConfig(engine="fast", compile=value),
                                should_stop=lambda: False, on_batch=lambda rows, tokens: None,
                                log=logging.getLogger("test"), model_name="tiny", output_tokens=tokens)
        return driver.generator.decoder.compiler.enabled

    assert compiled("on") and not compiled("off") and not compiled("auto", 10**9)
    with pytest.raises(ValueError, match="compile must be one of"):
        JobConfig(compile="yes")
