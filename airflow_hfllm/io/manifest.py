"""Output columns, per-part counts and the job fingerprint."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa

FINISH_REASONS = ("stop", "length", "unsafe_prompt", "unsafe_output", "error")
COUNT_KEYS = ("rows", "generated", "unsafe_prompt", "unsafe_output", "errors", "prompt_tokens", "output_tokens")

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
OUTPUT_COLUMNS = ("id", *(f.name for f in OUTPUT_FIELDS))


def output_schema(id_type: pa.DataType, keep: list[pa.Field], metadata: dict) -> pa.Schema:
    fields = [pa.field("id", id_type), *OUTPUT_FIELDS, *keep]
    return pa.schema(fields, metadata={b"hfllm": json.dumps(metadata, sort_keys=True, default=str).encode()})


def count(finish_reasons: list[str], prompt_tokens: list[int], output_tokens: list[int]) -> dict:
    return {
        "rows": len(finish_reasons),
        "generated": sum(r in ("stop", "length", "unsafe_output") for r in finish_reasons),
        "unsafe_prompt": finish_reasons.count("unsafe_prompt"),
        "unsafe_output": finish_reasons.count("unsafe_output"),
        "errors": finish_reasons.count("error"),
        "prompt_tokens": int(sum(prompt_tokens)),
        "output_tokens": int(sum(output_tokens)),
    }


def add_counts(records) -> dict:
    total = dict.fromkeys(COUNT_KEYS, 0)
    for record in records:
        for key in COUNT_KEYS:
            total[key] += record["counts"][key]
    return total


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]
