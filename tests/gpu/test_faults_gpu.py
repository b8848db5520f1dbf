"""Faults on a real GPU (issue 14): CUDA out of memory in the middle of a job, and a job cancelled the way
the operator's ``on_kill`` cancels it. Run with ``-s``: each test prints one line of measured numbers.

The model is a random Qwen2 of ~130M parameters with the tiny tokenizer (32 KiB of bf16 KV cache per
token), built on the GPU and saved once: its KV cache at 256 rows is GiBs, so the allocator's rounding (a
few MiB) does not blur the memory limits below, and it loads and runs in seconds.

Out of memory is forced with ``torch.cuda.set_per_process_memory_fraction``, set to what this process
has reserved plus a headroom in bytes (60% of what the same job needed above the weights when
unconstrained). The engines size their batches from ``torch.cuda.mem_get_info`` (the whole GPU looks
free) and from ``batch_size``, so their first full batch meets a limit they did not plan for, as it does
when another process takes memory; the cap on the caching allocator makes that exact, whatever the
GPU's size. (A filler tensor would instead shrink what ``mem_get_info`` reports, and the engines would
plan around it.)
"""

import gc
import hashlib
import threading
import time

import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from airflow_hfllm.engine.cache import MODEL_CACHE  # noqa: E402
from airflow_hfllm.engine.generate import Cancelled  # noqa: E402
from airflow_hfllm.engine.loading import get_model  # noqa: E402
from airflow_hfllm.config import GenerationParams, ModelSpec  # noqa: E402
from airflow_hfllm.run.job import TextJob  # noqa: E402
from tests.conftest import write_prompts  # noqa: E402

MiB = 2**20


@pytest.fixture(scope="module")
def small_lm(tmp_path_factory):
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from airflow_hfllm.testing.text import tokenizer

    path = tmp_path_factory.mktemp("small-lm")
    tok = tokenizer("causal-lm")
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.pad_token_id)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096,
                         tie_word_embeddings=False, **ids)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    del model
    free_gpu()
    return str(path)


def free_gpu() -> None:
    gc.collect()
    torch.cuda.synchronize(0)
    torch.cuda.empty_cache()


def allocated() -> int:
    torch.cuda.synchronize(0)
    return torch.cuda.memory_allocated(0)


def read(folder) -> pd.DataFrame:
    return pd.read_parquet(folder).sort_values("id").reset_index(drop=True)


def assert_complete(df: pd.DataFrame, n: int) -> None:
    """Every input id exactly once, each with an output and no error."""
    assert df.id.is_unique and set(df.id) == set(range(n)), "ids lost or repeated"
    assert df.error.isna().all(), df.error.dropna().unique()[:5]
    assert df.finish_reason.isin(["stop", "length"]).all() and df.output.notna().all()


@pytest.mark.parametrize("engine", ["batched", "fast"])
def test_out_of_memory_splits_and_loses_nothing(small_lm, tmp_path, engine):
    n = 512
    write_prompts(tmp_path / "in.parquet", n)

    def job(out):
        return TextJob(input=str(tmp_path / "in.parquet"), output=str(tmp_path / out), model=ModelSpec(small_lm),
                       params=GenerationParams(max_new_tokens=64, do_sample=False), chunk_rows=256,
                       batch_size=256, engine=engine)

    MODEL_CACHE.clear()
    try:
        get_model(ModelSpec(small_lm))  # loaded now, so both jobs take it from the cache
        free_gpu()
        weights = allocated()
        free = job("free").run()
        assert free["engine"] == ("fast" if engine == "fast" else "batched-generate")
        assert free["engine_stats"]["oom_splits"] == 0
        need = free["peak_gpu_memory_bytes"] - weights
        assert need > 1024 * MiB  # GiBs of KV cache: the cap below is far above the allocator's rounding
        headroom = int(0.6 * need)
        free_gpu()
        reserved = torch.cuda.memory_reserved(0)
        total = torch.cuda.get_device_properties(0).total_memory
        try:
            torch.cuda.set_per_process_memory_fraction((reserved + headroom) / total, 0)
            tight = job("tight").run()
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, 0)
    finally:
        MODEL_CACHE.clear()
    a, b = read(tmp_path / "free"), read(tmp_path / "tight")
    assert_complete(a, n)
    assert_complete(b, n)
    assert tight["counts"]["errors"] == 0 and tight["counts"]["rows"] == n
    stats = tight["engine_stats"]
    assert stats["oom_splits"] > 0 and stats["oom_errors"] == 0, stats
    tight_need = tight["peak_gpu_memory_bytes"] - weights
    assert tight_need < need  # it really ran in less memory
    if engine == "fast":
        assert stats["slots"] < 256
        detail = f"slots 256 -> {stats['slots']}"
    else:
        assert stats["token_budget"] < free["engine_stats"]["token_budget"]
        detail = f"token budget {free['engine_stats']['token_budget']} -> {stats['token_budget']}"
    agree = (a.output == b.output).mean()
    print(f"\nOOM, {engine} engine, {n} rows x 64 new tokens, batch_size 256, {torch.cuda.get_device_name(0)}: "
          f"unconstrained {need / MiB:.0f} MiB over the weights ({weights / MiB:.0f} MiB), "
          f"{free['generate_seconds']} s; capped at {headroom / MiB:.0f} MiB over them: {stats['oom_splits']} "
          f"splits ({detail}), peak {tight_need / MiB:.0f} MiB, {tight['generate_seconds']} s; all {n} ids once, "
          f"0 errors; outputs equal to the unconstrained run's: {agree:.0%} (bf16 rounding differs by batch shape)")


def snapshot(out) -> dict:
    """Committed parts: commit record and part bytes, and the part file's mtime."""
    parts = {}
    for commit in sorted((out / "_commits").glob("part-*.json")):
        part = out / (commit.stem + ".parquet")
        parts[commit.stem] = (commit.read_bytes(), hashlib.sha256(part.read_bytes()).hexdigest(),
                              part.stat().st_mtime_ns)
    return parts


def test_cancel_like_on_kill_frees_the_gpu_and_a_rerun_completes(small_lm, tmp_path):
    n, new, chunk = 6000, 128, 200
    write_prompts(tmp_path / "in.parquet", n)
    out = tmp_path / "out"

    def job():  # engine "auto", as the operator's default: the fast engine on a GPU
        return TextJob(input=str(tmp_path / "in.parquet"), output=str(out), model=ModelSpec(small_lm),
                       params=GenerationParams(max_new_tokens=new, do_sample=False), chunk_rows=chunk)

    MODEL_CACHE.clear()
    free_gpu()
    if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):  # per-stream cuBLAS workspaces outlive any job
        torch._C._cuda_clearCublasWorkspaces()
    before = allocated()
    running = job()
    state = {}

    def execute():
        """What the operator's execute() does around run(); on_kill calls cancel() from another thread."""
        try:
            state["manifest"] = running.run()
        except Cancelled:
            state["cancelled"] = time.monotonic()
            state["held"] = allocated()  # the model and the KV cache, when Cancelled arrives
            state["peak"] = torch.cuda.max_memory_allocated(0)
            MODEL_CACHE.clear()  # execute()'s cleanup, in its except block
            state["in_except"] = allocated()
        except BaseException as exc:  # noqa: BLE001 (reported by the main thread)
            state["error"] = f"{type(exc).__name__}: {exc}"

    # The main thread only polls files while the job runs (no CUDA calls next to a graph capture).
    thread = threading.Thread(target=execute, name="hfllm-job", daemon=True)
    started = time.monotonic()
    thread.start()
    deadline = started + 300
    while not list((out / "_commits").glob("part-*.json")):
        assert thread.is_alive(), f"the job ended before its first part: {state}"
        assert time.monotonic() < deadline, "no part committed within 300 s"
        time.sleep(0.005)
    first_part = time.monotonic() - started
    cancelled_at = time.monotonic()
    running.cancel()
    thread.join(timeout=120)
    assert not thread.is_alive(), "run() did not stop within 120 s of cancel()"
    assert "error" not in state, state["error"]
    assert "manifest" not in state, "the job finished before it was cancelled: give it more rows"
    stop_seconds = state["cancelled"] - cancelled_at
    assert stop_seconds < 30
    after_except = allocated()  # execute()'s except block is over: its traceback, and the job's frames, gone
    del running
    MODEL_CACHE.clear()  # gc.collect() and torch.cuda.empty_cache()
    if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
        torch._C._cuda_clearCublasWorkspaces()
    after = allocated()
    held = state["held"] - before
    assert held > 1024 * MiB  # the test measures something: model and KV cache were on the GPU
    assert after - before <= 64 * MiB, f"{(after - before) / MiB:.0f} MiB still allocated after the cancel"

    kept = snapshot(out)
    assert kept and sorted(p.stem for p in out.glob("part-*.parquet")) == sorted(kept)  # no part without commit
    assert not (out / "_manifest.json").exists()
    rerun_started = time.monotonic()
    try:
        manifest = job().run()
    finally:
        MODEL_CACHE.clear()
    rerun_seconds = time.monotonic() - rerun_started
    assert_complete(read(out), n)
    assert manifest["counts"]["rows"] == n and manifest["counts"]["errors"] == 0
    assert {k: v for k, v in snapshot(out).items() if k in kept} == kept  # committed parts not rewritten
    parts = len(manifest["parts"])
    rerun = [a for a in manifest["attempts"] if a.get("finished")]
    assert len(manifest["attempts"]) == 2 and len(rerun) == 1
    written = {f"part-{i:05d}" for i in rerun[0]["parts_written"]}
    assert not written & set(kept) and len(written) + len(kept) == parts == -(-n // chunk)
    print(f"\ncancel, {manifest['engine']} engine, {n} rows x {new} new tokens, {torch.cuda.get_device_name(0)}: "
          f"first part committed {first_part:.1f} s after start; run() raised Cancelled {stop_seconds * 1000:.0f} ms "
          f"after cancel(); allocated MiB before {before / MiB:.0f}, when Cancelled was caught "
          f"{state['held'] / MiB:.0f} (peak {state['peak'] / MiB:.0f}), in execute()'s except block after "
          f"MODEL_CACHE.clear() {state['in_except'] / MiB:.0f}, once that block ended {after_except / MiB:.0f}, "
          f"after MODEL_CACHE.clear() again {after / MiB:.0f}; {len(kept)} of {parts} parts kept, the rerun "
          f"wrote the other {len(written)} in {rerun_seconds:.1f} s, all {n} ids once")
