import atexit
import os
import shutil
import tempfile

# Before torch is imported anywhere: tiny models gain nothing from threads, and two busy OpenMP pools
# on a 2-core machine slow generation down a hundredfold.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Airflow, where a test imports it in this process, keeps its config and database apart from the user's
# (~/airflow) and from the other test worker's (make test runs two).
os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="hfllm-test-airflow-")
atexit.register(shutil.rmtree, os.environ["AIRFLOW_HOME"], True)

import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

WORDS = ("river", "engine", "market", "garden", "signal", "yellow", "quiet", "planet", "number", "window",
         "silver", "forest", "bridge", "letter", "winter", "coffee", "rocket", "pencil", "castle", "thunder")


def prompt_text(i: int) -> str:
    """Deterministic prompts of mixed length (3 to ~120 words)."""
    n = 3 + (i * 37) % 120
    return " ".join(WORDS[(i * 7 + k * k + k * i) % len(WORDS)] for k in range(n)) + f" #{i}"


def write_prompts(path, n: int, start: int = 0, **extra) -> pd.DataFrame:
    df = pd.DataFrame({"id": list(range(start, start + n)), "prompt": [prompt_text(i) for i in range(start, start + n)]})
    for name, values in extra.items():
        df[name] = values
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(path, index=False)
    return df


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``make test`` runs two pytest-xdist workers with ``--dist loadfile``: a worker takes whole files, so a
    module's fixtures are built once. Here the end-to-end files count as one, so that one worker runs them all
    and starts their deployment once (tests/e2e/conftest.py). ``--no-loadscope-reorder`` hands the files out
    in collection order, the longest (e2e, then the DAG runs) first."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class EndToEndAsOneFile(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return "tests/e2e" if path.startswith("tests/e2e/") else path

    return EndToEndAsOneFile(config, log)


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Tiny models built offline once per session, loaded through from_pretrained by the tests."""
    from airflow_hfllm.testing.models import make_tiny_model

    root = tmp_path_factory.mktemp("models")
    built = {}

    def get(kind: str = "causal-lm", verdict: str | None = None):
        key = (kind, verdict)
        if key not in built:
            built[key] = make_tiny_model(root / f"{kind}-{verdict or 'random'}", kind, verdict=verdict)
        return str(built[key])

    return get


@pytest.fixture(scope="session")
def tiny_lm(models):
    return models("causal-lm")


@pytest.fixture(scope="session")
def loaded(tiny_lm):
    """The tiny causal LM through the package's loader (and its model cache)."""
    from airflow_hfllm.config import ModelSpec
    from airflow_hfllm.engine.loading import get_model

    return get_model(ModelSpec(tiny_lm))


def chat_requests(tokenizer, n: int, new) -> list:
    """Engine requests of ``n`` one-message chats (:func:`prompt_text`), each of ``new`` new tokens (a number,
    or a function of the row's index)."""
    from airflow_hfllm.engine.generate import Request
    from airflow_hfllm.engine.prompts import encode

    tokens = new if callable(new) else (lambda i: new)
    return [Request(encode(tokenizer, [{"role": "user", "content": prompt_text(i)}]), tokens(i)) for i in range(n)]


@pytest.fixture
def quick_inductor():
    """Inductor set to compile fast on the CPU (in process, scalar C++): a test checks what is compiled and
    what it computes, not the CPU's SIMD code."""
    import torch._inductor.config as inductor

    with inductor.patch({"cpp.vec_isa_ok": False, "compile_threads": 1}):
        yield


@pytest.fixture
def no_tf32():
    """fp32 matmuls in full precision on a GPU for the test's duration (TF32 off)."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def failing_compile(calls: list):
    """A stand-in for ``torch.compile`` whose compiled functions fail at their first call, as a real compile
    failure does (no C++ compiler); each call appends the function to ``calls``."""
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            calls.append(fn)
            raise RuntimeError("inductor: no C++ compiler")
        return run

    return broken_compile


def kill_after_first_part(cmd: list[str], out) -> dict:
    """Run ``cmd`` (an ``hfllm`` job writing to ``out``), SIGKILL it and its children once its first part is
    committed, and return the committed parts' (inode, mtime): a rerun must leave them as they are."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first_commit = out / "_commits" / "part-00000.json"
    deadline = time.monotonic() + 240
    while not first_commit.exists():
        assert proc.poll() is None, "the run ended before its first part"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("part-*.parquet")
            if (out / "_commits" / p.name.replace(".parquet", ".json")).exists()}


def rerun_leaves(cmd: list[str], out, written: dict) -> subprocess.CompletedProcess:
    """Run ``cmd`` again to the end and check that it left the parts ``written`` (as
    :func:`kill_after_first_part` returned them) as they were."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for name, stamp in written.items():
        p = out / name
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp, f"{name} was rewritten"
    return done
