"""A constrained batch on the fast engine on a GPU: CUDA graphs with the grammar's mask work overlapping
each step's forward pass (``engine/steps.py``) against the eager path, and the overlapped host work free of
host syncs (fp32 with TF32 off, so that graphs and eager run the same arithmetic). Then the CPU tests of
issue 18's contract (200 rows under a JSON schema, choices, rows cut short) on both engines with the GPU's
defaults (bf16, CUDA graphs, overlapped mask work)."""

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from airflow_hfllm.config import GenerationParams, ModelSpec  # noqa: E402
from airflow_hfllm.engine.fast import FastEngine  # noqa: E402
from airflow_hfllm.engine.grammar import Constraint  # noqa: E402
from airflow_hfllm.engine.loading import get_model  # noqa: E402
from tests.conftest import chat_requests  # noqa: E402
from tests.unit import test_constrained as cpu  # noqa: E402
from tests.unit.test_constrained import SCHEMA, valid  # noqa: E402


@pytest.fixture
def fp32(tiny_lm):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return get_model(ModelSpec(tiny_lm, dtype="float32"))


def texts(done):
    return [(c.text, c.output_tokens, c.finish_reason, c.error) for c in done]


@pytest.mark.parametrize("sample", [False, True])
def test_json_with_graphs_and_overlap_is_valid_and_equals_eager(fp32, sample, monkeypatch):
    def no_sync(method):  # the host's work around a step's forward launch must not sync
        def run(self, *args):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return method(self, *args)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return run

    params = GenerationParams(max_new_tokens=256, do_sample=sample, json_schema=SCHEMA)
    reqs = chat_requests(fp32.tokenizer, 96, lambda i: 12 if i % 8 == 0 else 256)  # some rows cut short
    eager = FastEngine(fp32, params, slots=16, cuda_graphs=False).generate(reqs, seed=0)
    for name in ("read", "catch_up"):
        monkeypatch.setattr(Constraint, name, no_sync(getattr(Constraint, name)))
    engine = FastEngine(fp32, params, slots=16)
    assert engine.cuda_graphs and engine.constraint.overlap  # the GPU's defaults
    graphs = engine.generate(reqs, seed=0)
    monkeypatch.undo()
    assert texts(graphs) == texts(eager)
    complete = [c.finish_reason == "stop" and c.error is None for c in graphs]
    assert sum(complete) >= 0.9 * sum(r.max_new_tokens == 256 for r in reqs)
    assert [valid(c.text) for c in graphs] == complete  # a row the grammar completed is valid; any other marked
    stats = engine.stats()
    assert stats["capture_seconds"] > 0 and stats["grammar_mask_seconds"] > 0
    print(f"\n{'sampled' if sample else 'greedy'}: {sum(complete)} of {len(reqs)} rows complete; {stats}")


def test_overlapped_and_serial_steps_agree_on_a_gpu(fp32):
    params = GenerationParams(max_new_tokens=128, do_sample=False, json_schema=SCHEMA)
    reqs = chat_requests(fp32.tokenizer, 64, 128)
    overlapped = FastEngine(fp32, params, slots=16).generate(reqs)
    serial = FastEngine(fp32, params, slots=16, grammar_overlap=False).generate(reqs)
    # the same draws; a replacement row may be prefilled with other rows than in series (a step later), and
    # prefill batches of another width may round differently
    agree = sum(a == b for a, b in zip(texts(overlapped), texts(serial))) / len(reqs)
    print(f"\noverlapped and serial steps agree on {agree:.0%} of {len(reqs)} rows")
    assert agree >= 0.95


@pytest.mark.parametrize("engine", cpu.ENGINES)
def test_the_cpu_contract_holds_on_a_gpu(tiny_lm, engine):
    loaded = get_model(ModelSpec(tiny_lm))
    assert loaded.device.type == "cuda"
    cpu.test_200_rows_under_a_json_schema_parse_and_validate(loaded, engine)
    for sample in (True, False):
        cpu.test_choices_are_the_only_outputs(loaded, engine, sample)
    cpu.test_a_row_cut_before_its_grammar_completes_ends_in_length_with_an_error(loaded, engine)
