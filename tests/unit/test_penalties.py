"""Presence and frequency penalties (OpenAI's semantics, over the tokens a row generated) in the fast engine
and in batched ``generate()``, eagerly on the CPU."""

import pytest
import torch

from airflow_hfllm.config import GenerationParams
from airflow_hfllm.engine.fast import FastEngine
from airflow_hfllm.engine.generate import BatchedGenerator, generate_kwargs, penalties
from airflow_hfllm.engine.sampling import penalise
from tests.conftest import chat_requests

GREEDY = GenerationParams(max_new_tokens=24, do_sample=False)


@pytest.fixture(scope="module")
def reqs(loaded):
    return chat_requests(loaded.tokenizer, 24, 24)


def token_ids(engine, reqs) -> list[list[int]]:
    """The tokens each row generated, up to its EOS, in request order."""
    seen, complete = [], engine._completion
    engine._completion = lambda ids, max_new: (seen.append(list(ids)), complete(ids, max_new))[1]
    if isinstance(engine, FastEngine):
        order = [tag for tag, _ in engine.stream(((i, r, i) for i, r in enumerate(reqs)), lookahead=len(reqs))]
    else:
        engine.generate(reqs)
        order = [i for batch in engine.batches(reqs) for i in batch]
    cut = [next((ids[:n] for n, t in enumerate(ids) if t in engine.eos), ids) for ids in seen]
    return [ids for _, ids in sorted(zip(order, cut))]


def repeats(rows: list[list[int]]) -> float:
    """The fraction of generated tokens that repeat an earlier token of their row."""
    return sum(len(r) - len(set(r)) for r in rows) / sum(len(r) for r in rows)


def test_penalise_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, -1.0, 0.5, 0.0]])
    counts = torch.tensor([[0.0, 1.0, 3.0, 0.0], [2.0, 0.0, 0.0, 1.0]])
    # token t loses presence * (count > 0) + frequency * count
    assert penalise(logits, counts, 0.5, 0.25).tolist() == [[1.0, 1.25, 1.75, 4.0], [-1.0, -1.0, 0.5, -0.75]]
    assert penalise(logits, counts, -1.0, 0.0).tolist() == [[1.0, 3.0, 4.0, 4.0], [1.0, -1.0, 0.5, 1.0]]
    assert torch.equal(penalise(logits, counts, 0.0, 0.0), logits)


def test_generate_counts_only_the_generated_tokens():
    # prompt (3 tokens, left-padded) [0, 5, 5], then generated 1, 2, 2
    processor = penalties(GenerationParams(presence_penalty=1.0, frequency_penalty=0.5), 3)
    out = processor(torch.tensor([[0, 5, 5, 1, 2, 2]]), torch.zeros(1, 6))
    assert out.tolist() == [[0.0, -1.5, -2.0, 0.0, 0.0, 0.0]]
    assert "logits_processor" not in generate_kwargs(GREEDY, 0, [1], None, 8, 3)
    assert "logits_processor" in generate_kwargs(GREEDY.replace(presence_penalty=0.1), 0, [1], None, 8, 3)


@pytest.mark.parametrize("engine", ["fast", "batched"])
def test_frequency_penalty_cuts_repetition(loaded, reqs, engine):
    make = (lambda p: FastEngine(loaded, p, slots=8)) if engine == "fast" else \
        (lambda p: BatchedGenerator(loaded, p, max_batch_size=8))
    plain = token_ids(make(GREEDY), reqs)
    penalised = token_ids(make(GREEDY.replace(frequency_penalty=2.0)), reqs)
    top = lambda rows: max(max(r.count(t) for t in r) for r in rows)  # noqa: E731
    assert sum(len(r) for r in plain) >= 500  # long rows: greedy on random weights loops
    # measured: 19% of the tokens repeat and one row has a token 10 times; penalised 8% and 4 times
    assert repeats(plain) > 0.15 and top(plain) >= 8
    assert repeats(penalised) < repeats(plain) / 2 and top(penalised) <= 4


def test_fast_engine_equals_generate_with_penalties(loaded, reqs):
    params = GREEDY.replace(presence_penalty=1.0, frequency_penalty=0.8, repetition_penalty=1.1, min_length=4)
    gen = BatchedGenerator(loaded, params, max_batch_size=8)
    assert len(gen.batches(reqs)) == 3  # left-padded batches: generated tokens start after the padded width
    reference = gen.generate(reqs)
    # 5 slots for 24 rows: slots are reused, so a row's counts start from zero when it is admitted
    fast = FastEngine(loaded, params, slots=5, steps_per_sync=3).generate(reqs)
    assert [(c.text, c.output_tokens, c.finish_reason) for c in fast] == \
        [(c.text, c.output_tokens, c.finish_reason) for c in reference]
    plain = FastEngine(loaded, GREEDY.replace(repetition_penalty=1.1, min_length=4), slots=5).generate(reqs)
    assert sum(a.text != b.text for a, b in zip(fast, plain)) >= 15  # the penalties did change the outputs


def test_sampled_rows_with_penalties_depend_on_seed_and_id_only(loaded, reqs):
    params = GenerationParams(max_new_tokens=24, do_sample=True, temperature=1.0, top_p=0.9, top_k=40,
                              presence_penalty=1.0, frequency_penalty=1.5)
    keys = [f"row-{i}" for i in range(len(reqs))]
    a = FastEngine(loaded, params, slots=8).generate(reqs, seed=3, keys=keys)
    b = FastEngine(loaded, params, slots=3, steps_per_sync=5).generate(reqs, seed=3, keys=keys)
    assert [c.text for c in a] == [c.text for c in b]
    plain = FastEngine(loaded, params.replace(presence_penalty=0.0, frequency_penalty=0.0), slots=8)
    assert sum(x.text != y.text for x, y in zip(a, plain.generate(reqs, seed=3, keys=keys))) >= 15


def test_zero_penalties_change_nothing(loaded, reqs):
    """At zero the penalties take no memory and no processor; forced through the counting path anyway,
    the outputs are the same, token for token."""
    plain = FastEngine(loaded, GREEDY, slots=6)
    expected = token_ids(plain, reqs)
    assert plain.counts is None
    counted = FastEngine(loaded, GREEDY, slots=6)
    counted._counted = True
    assert token_ids(counted, reqs) == expected and counted.counts is not None

    gen = BatchedGenerator(loaded, GREEDY, max_batch_size=8)
    expected = token_ids(gen, reqs)
    run = gen.loaded.model.generate

    def with_processor(*args, **kwargs):
        assert "logits_processor" not in kwargs
        return run(*args, logits_processor=penalties(GREEDY, kwargs["input_ids"].shape[1]), **kwargs)

    gen.loaded.model.generate = with_processor
    try:
        assert token_ids(gen, reqs) == expected
    finally:
        del gen.loaded.model.generate
