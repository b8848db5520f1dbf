"""``_manifest.json``: what a run wrote, built from the folder's commit records, one shape for a
whole job, a shard's summary and the merge of all shards. It is the operators' XCom value and the
source of the lineage facets."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from airflow_hfllm.io.parts import OutputDir, part_name
from airflow_hfllm.run.state import MANIFEST, SHARDS, now, shard_summary

COUNT_KEYS = ("rows", "generated", "unsafe_prompt", "unsafe_output", "errors", "prompt_tokens", "output_tokens")


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


# Keys only one shape has: left out of the JSON where they do not apply.
_SHAPED = ("shard", "shards", "vision")


@dataclass
class Manifest:
    """A run's manifest. Timings are the attempt's (``seconds`` from start to manifest); counts and
    parts are the folder's, over every attempt."""

    output: str
    parts: list[str]
    counts: dict
    fingerprint: str
    seed: int
    model: dict
    generation: dict
    safety: list
    input: dict
    chunk_rows: int
    started: str
    finished: str
    attempts: list
    checksums: dict[str, str | None] = field(default_factory=dict)
    engine: str | None = None
    device: str | None = None
    seconds: float = 0.0
    generate_seconds: float | None = None
    output_tokens_per_second: float | None = None
    load_seconds: float | None = None
    compile_seconds: float | None = None
    engine_stats: dict | None = None
    peak_gpu_memory_bytes: int | None = None
    airflow: dict | None = None
    shard: dict | None = None  # a shard's summary: its plan entry and chunk range
    shards: list | None = None  # a merged manifest: each shard's summary in brief
    vision: dict | None = None
    tokens: dict = field(init=False)

    def __post_init__(self):
        self.tokens = {"prompt": self.counts["prompt_tokens"], "output": self.counts["output_tokens"]}

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key in _SHAPED:
            if d[key] is None:
                del d[key]
        return d

    @property
    def rows(self) -> int:
        return self.counts["rows"]


def describe_parts(done: dict[int, dict]) -> dict[str, Any]:
    """The manifest's parts, checksums and counts, from the commit records."""
    keys = sorted(done)
    return {"parts": [part_name(k) for k in keys], "checksums": {part_name(k): done[k].get("sha256") for k in keys},
            "counts": add_counts(done[k] for k in keys)}


def merge_shards(out: OutputDir) -> Manifest:
    """``_manifest.json`` from the shards' summaries, once every planned chunk is committed."""
    summaries = []
    for path in sorted(out.fs.glob(out.join(SHARDS, "shard-*.json"))):
        if not path.endswith(".job.json"):
            with out.fs.open(path, "rb") as f:
                summaries.append(Manifest.from_dict(json.loads(f.read())))
    if not summaries:
        raise RuntimeError(f"no shard summaries in {out.uri}/{SHARDS}: did the shards run?")
    # The latest summary's plan is the run being merged; an earlier run's summaries (of more shards,
    # or over another input) are stale, and so are parts past this input's last chunk.
    plan = max(summaries, key=lambda s: s.finished).shard.get("plan")
    stale = [s for s in summaries if s.shard.get("plan") != plan]
    summaries = [s for s in summaries if s.shard.get("plan") == plan]
    fingerprints = {s.fingerprint for s in summaries}
    if len(fingerprints) != 1:
        raise RuntimeError(f"shards of {out.uri} ran different jobs (fingerprints {sorted(fingerprints)})")
    fp = fingerprints.pop()
    first = summaries[0]
    chunks = range(max(1, -(-first.input["rows"] // first.chunk_rows)))  # as Dataset.num_chunks
    commits = out.commits()
    missing = [k for k in chunks if commits.get(k, {}).get("fingerprint") != fp
               or not out.fs.exists(out.join(part_name(k)))]
    if missing:
        raise RuntimeError(f"{out.uri}: parts missing for chunks {missing[:10]}"
                           f"{' and more' if len(missing) > 10 else ''}: a shard has not finished")
    for s in stale:  # indices this plan has not (each index has one summary file, its latest)
        out.remove(shard_summary(s.shard["index"]))
        out.remove(shard_summary(s.shard["index"]).replace(".json", ".job.json"))
    for index in sorted(out.part_indices() | set(commits)):
        if index not in chunks:
            out.remove_part(index)
    seconds = max(s.seconds for s in summaries)
    manifest = Manifest(
        output=out.uri, **describe_parts({k: commits[k] for k in chunks}),
        fingerprint=fp, seed=first.seed, model=first.model, generation=first.generation, safety=first.safety,
        input=first.input, chunk_rows=first.chunk_rows, engine=first.engine, seconds=seconds,
        # every shard's own rate, and the rate of the whole run as its slowest shard saw it
        output_tokens_per_second=round(sum(s.tokens["output"] for s in summaries) / seconds, 1) if seconds else None,
        shards=[{"index": s.shard["index"], "chunks": s.shard["chunks"], "rows": s.rows, "seconds": s.seconds,
                 "output_tokens_per_second": s.output_tokens_per_second, "engine": s.engine, "device": s.device,
                 "airflow": s.airflow} for s in summaries],
        started=min(s.started for s in summaries), finished=now(), attempts=out.attempts(),
        vision=first.vision)
    out.write_json(MANIFEST, manifest.to_dict())
    return manifest
