"""Output text (engine/decoding.py): gpt-oss's harmony channels become a think block that reasoning=True
moves into the reasoning column; other outputs decode as decode(skip_special_tokens=True) does. Through
both engines' own completion step, with the tiny model's tokenizer given gpt-oss's special tokens."""

import dataclasses

import pytest

from airflow_hfllm.config import GenerationParams
from airflow_hfllm.engine.decoding import output_text
from airflow_hfllm.engine.fast import FastEngine
from airflow_hfllm.engine.generate import BatchedGenerator
from airflow_hfllm.run.rows import split_reasoning
from airflow_hfllm.testing.text import tokenizer

HARMONY = ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>"]


@pytest.fixture(scope="module")
def harmony():
    tok = tokenizer()
    tok.add_special_tokens({"additional_special_tokens": HARMONY})
    return tok


def ids(tok, *parts):
    """Token ids of ``parts``: harmony tokens by name, text encoded."""
    out = []
    for part in parts:
        out += [tok.convert_tokens_to_ids(part)] if part in HARMONY else tok.encode(part, add_special_tokens=False)
    return out


def test_analysis_channel_becomes_the_reasoning(harmony):
    output = ids(harmony, "<|channel|>", "analysis", "<|message|>", "the user wants a number", "<|end|>",
                 "<|start|>", "assistant", "<|channel|>", "final", "<|message|>", "the number is four")
    text = output_text(harmony, output)
    assert text == "<think>the user wants a number</think>the number is four"
    assert split_reasoning(text) == ("the user wants a number", "the number is four")
    plain = harmony.decode(output, skip_special_tokens=True)
    assert "analysis" in plain and "assistantfinal" in plain.replace(" ", "")  # what decoding alone leaves


def test_cut_inside_the_analysis_is_all_reasoning(harmony):
    text = output_text(harmony, ids(harmony, "<|channel|>", "analysis", "<|message|>", "we need to think"))
    assert split_reasoning(text) == ("we need to think", "")


def test_other_outputs_decode_as_before(harmony):
    for output in (ids(harmony, "a plain answer"), ids(harmony, "an answer", "<|end|>")):
        assert output_text(harmony, output) == harmony.decode(output, skip_special_tokens=True)
    plain = tokenizer()  # no channels in its vocabulary
    output = plain.encode("some words here", add_special_tokens=False)
    assert output_text(plain, output) == plain.decode(output, skip_special_tokens=True)


@pytest.mark.parametrize("engine", ["fast", "batched"])
def test_both_engines_write_the_channels_as_a_think_block(loaded, harmony, engine):
    loaded = dataclasses.replace(loaded, tokenizer=harmony)
    params = GenerationParams(max_new_tokens=8, do_sample=False)
    runner = FastEngine(loaded, params, slots=2) if engine == "fast" else BatchedGenerator(loaded, params)
    output = ids(harmony, "<|channel|>", "analysis", "<|message|>", "short thought", "<|end|>", "<|start|>",
                 "assistant", "<|channel|>", "final", "<|message|>", "done")
    completion, kept = runner._completion(output, 64)
    assert completion.text == "<think>short thought</think>done" and kept == output
    assert completion.output_tokens == len(output)
