"""The output parts' columns: one schema for every part of a folder."""

from __future__ import annotations

import json

import pyarrow as pa

FINISH_REASONS = ("stop", "length", "unsafe_prompt", "unsafe_output", "error")

VERDICT = pa.struct([
    ("checker", pa.string()),
    ("safe", pa.bool_()),
    ("score", pa.float64()),
    ("categories", pa.list_(pa.string())),
])


# Every part's columns before the keep columns; ``id`` takes the input id column's (unified) type.
OUTPUT_FIELDS = (
    pa.field("output", pa.string()),
    pa.field("finish_reason", pa.string()),
    pa.field("prompt_safe", pa.bool_()),
    pa.field("output_safe", pa.bool_()),
    pa.field("prompt_safety", pa.list_(VERDICT)),
    pa.field("output_safety", pa.list_(VERDICT)),
    pa.field("error", pa.string()),
    pa.field("prompt_tokens", pa.int32()),
    pa.field("output_tokens", pa.int32()),
)
# Only in folders written with them: reasoning=True, num_return_sequences > 1, logprobs=K.
REASONING = pa.field("reasoning", pa.string())
SAMPLE = pa.field("sample", pa.int32())
TOKEN = [("id", pa.int32()), ("token", pa.string()), ("logprob", pa.float64())]
LOGPROBS = (
    pa.field("output_logprob", pa.float64()),
    # per output token: the token, and the K likeliest at its step (which may or may not include it)
    pa.field("top_logprobs", pa.list_(pa.struct([*TOKEN, ("top", pa.list_(pa.struct(TOKEN)))]))),
)
# choices with logprobs: each choice's total log-probability after the prompt, in the order of the choices
CHOICE_LOGPROBS = pa.field("choice_logprobs", pa.list_(pa.struct([("choice", pa.string()), ("logprob", pa.float64())])))
OUTPUT_COLUMNS = ("id", SAMPLE.name, *(f.name for f in OUTPUT_FIELDS), REASONING.name, *(f.name for f in LOGPROBS),
                  CHOICE_LOGPROBS.name)


def output_schema(id_type: pa.DataType, keep: list[pa.Field], metadata: dict, reasoning: bool = False,
                  samples: bool = False, logprobs: bool = False, choices: bool = False) -> pa.Schema:
    fields = [pa.field("id", id_type), *([SAMPLE] if samples else []), OUTPUT_FIELDS[0],
              *([REASONING] if reasoning else []), *OUTPUT_FIELDS[1:], *(LOGPROBS if logprobs else ()),
              *([CHOICE_LOGPROBS] if choices else []), *keep]
    return pa.schema(fields, metadata={b"hfllm": json.dumps(metadata, sort_keys=True, default=str).encode()})
