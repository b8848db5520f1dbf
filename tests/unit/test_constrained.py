"""Constrained outputs (json_schema, regex, choices) on both engines, on the CPU, with the tiny random model:
unconstrained it writes gibberish words, so what parses here is the grammar's doing."""

import json
import re
import signal

import jsonschema
import pandas as pd
import pytest

from airflow_hfllm.cli import main
from airflow_hfllm.config import GenerationParams
from airflow_hfllm.engine.fast import FastEngine
from airflow_hfllm.engine.generate import BatchedGenerator, Request
from airflow_hfllm.engine.grammar import CUT
from tests.conftest import chat_requests, write_prompts

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}, "verified": {"type": "boolean"},
                           "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
                                       "required": ["city"], "additionalProperties": False}},
            "required": ["age", "verified", "address"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "kind", "tags", "owner"],
    "additionalProperties": False,
}
ENGINES = {"batched": lambda loaded, params: BatchedGenerator(loaded, params),
           "fast": lambda loaded, params: FastEngine(loaded, params, slots=16)}


def valid(text) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


@pytest.mark.parametrize("engine", ENGINES)
def test_200_rows_under_a_json_schema_parse_and_validate(loaded, engine):
    reqs = chat_requests(loaded.tokenizer, 200, 256)
    free = ENGINES[engine](loaded, GenerationParams(max_new_tokens=256)).generate(reqs[:20], seed=0)
    assert not any(valid(c.text) for c in free)  # gibberish unconstrained
    done = ENGINES[engine](loaded, GenerationParams(max_new_tokens=256, json_schema=SCHEMA)).generate(reqs, seed=0)
    rate = sum(valid(c.text) for c in done) / len(done)
    print(f"{engine}: {rate:.1%} of 200 rows valid")
    assert rate >= 0.9
    # a row the grammar completed is valid; any other is marked
    assert all(valid(c.text) == (c.finish_reason == "stop" and c.error is None) for c in done)
    assert len({c.text for c in done}) >= 150  # sampled, and still varied


def test_engines_agree_under_a_grammar_when_greedy(loaded):
    reqs = chat_requests(loaded.tokenizer, 24, 256)
    params = GenerationParams(max_new_tokens=256, do_sample=False, json_schema=SCHEMA)
    batched = BatchedGenerator(loaded, params, max_batch_size=1).generate(reqs)
    fast = FastEngine(loaded, params, slots=5).generate(reqs)
    assert [c.text for c in fast] == [c.text for c in batched]
    assert all(valid(c.text) and c.finish_reason == "stop" for c in fast)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("sample", [True, False])
def test_choices_are_the_only_outputs(loaded, engine, sample):
    # "yes" is a prefix of "yes please": complete, yet it may go on
    params = GenerationParams(max_new_tokens=16, do_sample=sample, choices="yes,no,yes please,maybe later")
    done = ENGINES[engine](loaded, params).generate(chat_requests(loaded.tokenizer, 40, 16), seed=1)
    assert all(c.text in params.choices and c.finish_reason == "stop" and c.error is None for c in done)
    if sample:
        assert len({c.text for c in done}) >= 3


@pytest.mark.parametrize("engine", ENGINES)
def test_regex_outputs_match_it(loaded, engine):
    pattern = r"(cat|dog)-[0-9]{2,4}( [a-z]{1,8}){1,3}"
    params = GenerationParams(max_new_tokens=48, regex=pattern)
    done = ENGINES[engine](loaded, params).generate(chat_requests(loaded.tokenizer, 40, 48), seed=2)
    assert all(c.finish_reason == "stop" and re.fullmatch(pattern, c.text) for c in done), done
    assert len({c.text for c in done}) >= 30


@pytest.mark.parametrize("engine", ENGINES)
def test_a_row_cut_before_its_grammar_completes_ends_in_length_with_an_error(loaded, engine):
    params = GenerationParams(max_new_tokens=64, json_schema=SCHEMA)
    # rows of 8 tokens cannot close the object; the 64-token rows in the same batch can
    reqs = [Request(r.input_ids, 8 if i % 2 else 64) for i, r in enumerate(chat_requests(loaded.tokenizer, 12, 0))]
    done = ENGINES[engine](loaded, params).generate(reqs, seed=3)
    for i, c in enumerate(done):
        if i % 2:
            assert (c.finish_reason, c.error, c.output_tokens) == ("length", CUT, 8) and c.text.startswith("{")
            assert not valid(c.text)


@pytest.mark.parametrize("kwargs, message", [
    (dict(json_schema={"type": "object", "properties": {"a": {"type": "nonsense"}}}), "json_schema is invalid"),
    (dict(json_schema="{not json"), "json_schema is not JSON"),
    (dict(json_schema="/no/such/schema.json"), "json_schema: cannot read"),
    (dict(regex="a(b"), "regex is invalid"),
    (dict(regex="a", choices=["a"]), "regex and choices are set together"),
    (dict(json_schema={"type": "object"}, regex="a"), "json_schema and regex are set together"),
    (dict(choices="a,,b"), "choices must be non-empty strings"),
])
def test_bad_constraints_are_refused_up_front(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        GenerationParams(**kwargs)


def test_cli_json_schema_file_and_choices(tiny_lm, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # in process: pytest keeps its own SIGTERM
    write_prompts(tmp_path / "in.parquet", 12)
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    job = ["text", "--model", tiny_lm, "--input", str(tmp_path / "in.parquet")]
    schema = ["--json-schema", str(tmp_path / "schema.json")]
    assert main([*job, "--output", str(tmp_path / "json"), *schema, "--max-new-tokens", "256"]) == 0
    out = pd.read_parquet(tmp_path / "json")
    assert len(out) == 12 and sum(map(valid, out.output)) >= 11

    # cut short: written with finish_reason "length" and the error, not counted as a failed row
    assert main([*job, "--output", str(tmp_path / "cut"), *schema, "--max-new-tokens", "6"]) == 0
    out = pd.read_parquet(tmp_path / "cut")
    assert (out.finish_reason == "length").all() and (out.error == CUT).all() and out.output.str.startswith("{").all()

    assert main([*job, "--output", str(tmp_path / "choices"), "--choices", "red,green,blue", "--max-new-tokens", "8",
                 "--engine", "fast"]) == 0
    assert set(pd.read_parquet(tmp_path / "choices").output) <= {"red", "green", "blue"}

    capsys.readouterr()
    assert main([*job, "--output", str(tmp_path / "bad"), "--regex", "a(b"]) == 2
    assert "hfllm: error: regex is invalid" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_a_masked_token_is_never_drawn_even_when_the_noise_is_infinite(monkeypatch):
    import torch

    from airflow_hfllm.engine import sampling

    # every uniform draw rounds to 1.0 in float32: Gumbel noise +inf, which made a -inf logit NaN (argmax's pick)
    monkeypatch.setattr(sampling, "mix", lambda x: torch.full_like(x, -1))
    sampler = sampling.Sampler(GenerationParams(top_k=0, top_p=1.0, temperature=1.0), 4, [], "cpu")
    logits = torch.tensor([[float("-inf"), 0.0, float("-inf"), 1.0]])
    drawn = sampler(logits, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    assert drawn.item() in (1, 3)


@pytest.mark.parametrize("kwargs, new", [
    (dict(json_schema=SCHEMA), lambda i: 8 if i % 5 == 0 else 200),  # some rows cut, the rest complete
    (dict(choices="yes,no,yes please,maybe later"), lambda i: 16),
    (dict(regex=r"(cat|dog)-[0-9]{2,4}( [a-z]{1,8}){1,3}", do_sample=False), lambda i: 48),
])
def test_fast_engine_overlapped_grammar_steps_draw_what_serial_steps_draw(loaded, kwargs, new):
    # overlapped (a GPU's default): each step's forward pass is launched before the host advances the
    # matchers and fills the masks, and the draw after; on the CPU the same order runs eagerly
    reqs = chat_requests(loaded.tokenizer, 30, new)
    params = GenerationParams(max_new_tokens=200, **kwargs)
    serial = FastEngine(loaded, params, slots=7)
    assert serial.constraint.overlap is False  # the CPU's default: as before the overlap
    overlapped = FastEngine(loaded, params, slots=7, grammar_overlap=True)
    order = []
    for name in ("_forward", "_sampled"):
        method = getattr(overlapped, name)
        setattr(overlapped, name, lambda *a, method=method, name=name: (order.append(name), method(*a))[1])
    catch_up = overlapped.constraint.catch_up
    overlapped.constraint.catch_up = lambda *a: (order.append("masks"), catch_up(*a))[1]
    a, b = serial.generate(reqs, seed=4), overlapped.generate(reqs, seed=4)
    assert [(c.text, c.output_tokens, c.finish_reason, c.error) for c in b] == \
        [(c.text, c.output_tokens, c.finish_reason, c.error) for c in a]
    assert order[:6] == ["_forward", "masks", "_sampled"] * 2  # the masks between a step's forward and its draw
    assert order.count("_forward") == order.count("masks") == overlapped.stats()["decode_steps"]
    # a row completed by its grammar is found so during the next step's forward pass: at most one more step each
    assert serial.stats()["decode_steps"] <= overlapped.stats()["decode_steps"] <= serial.stats()["decode_steps"] + 30
    assert overlapped.stats()["grammar_mask_seconds"] > 0 and serial.stats()["grammar_mask_seconds"] > 0


def test_apply_mask_masks_exactly_the_zero_bits():
    """Token t is bit t % 32 of word t // 32 (the sign bit included), and the words' padding bits are ignored."""
    import torch

    from airflow_hfllm.engine.grammar import apply_mask

    torch.manual_seed(0)
    for vocab in (37, 100):
        mask = torch.randint(-2**31, 2**31 - 1, (4, (vocab + 31) // 32), dtype=torch.int32)
        allowed = torch.tensor([[(int(mask[r, t // 32]) >> (t % 32)) & 1 for t in range(vocab)] for r in range(4)])
        logits = torch.randn(4, vocab)
        out = apply_mask(logits, mask)
        assert torch.equal(torch.isinf(out), allowed == 0) and torch.equal(out[allowed == 1], logits[allowed == 1])
