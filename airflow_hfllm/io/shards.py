"""Sharding one input over several tasks: plan shards on chunk boundaries, merge their summaries.

A planner task checks the input once (columns, ids unique across all files) and cuts its chunks into
contiguous ranges balanced by rows; each shard runs the ordinary job over its range, writing its own
parts and ``_shards/shard-NNNNN.json``; the merge step checks that every chunk is committed with one
fingerprint and writes ``_manifest.json``.
"""

from __future__ import annotations

import json
import random
import uuid
from datetime import datetime, timezone

from airflow_hfllm.io.dataset import Dataset
from airflow_hfllm.io.manifest import add_counts
from airflow_hfllm.io.parts import OutputDir, part_name


def plan_shards(dataset: Dataset, chunk_rows: int, shards: int, seed: int | None = None) -> list[dict]:
    """Up to ``shards`` ranges ``[first_chunk, end_chunk)`` with about equal rows. ``seed`` (drawn
    here when ``None``) goes to every shard, so sampling does not depend on the plan."""
    if shards < 1:
        raise ValueError("shards must be >= 1")
    rows = dataset.chunk_sizes(chunk_rows)
    n = len(rows)
    seed = random.SystemRandom().randrange(2**31) if seed is None else seed
    # Names this run's shards, so the merge tells them from an earlier run's (another shard count).
    plan_id = uuid.uuid4().hex[:12]
    plan, first, taken = [], 0, 0
    for k in range(n):
        taken += rows[k]
        # close this shard once it holds its share of the rows (the last one takes the rest)
        if taken * shards >= dataset.rows * (len(plan) + 1) or k == n - 1:
            plan.append({"index": len(plan), "first_chunk": first, "end_chunk": k + 1,
                         "rows": sum(rows[first:k + 1]), "seed": seed, "plan": plan_id})
            first = k + 1
    return plan


def merge_shards(out: OutputDir) -> dict:
    """``_manifest.json`` from the shards' summaries, once every planned chunk is committed."""
    summaries = []
    for path in sorted(out.fs.glob(out.join("_shards", "shard-*.json"))):
        if not path.endswith(".job.json"):
            with out.fs.open(path, "rb") as f:
                summaries.append(json.loads(f.read()))
    if not summaries:
        raise RuntimeError(f"no shard summaries in {out.uri}/_shards: did the shards run?")
    # The latest summary's plan is the run being merged; an earlier run's summaries (of more shards,
    # or over another input) are stale, and so are parts past this input's last chunk.
    plan = max(summaries, key=lambda s: s["finished"])["shard"].get("plan")
    stale = [s for s in summaries if s["shard"].get("plan") != plan]
    summaries = [s for s in summaries if s["shard"].get("plan") == plan]
    fingerprints = {s["fingerprint"] for s in summaries}
    if len(fingerprints) != 1:
        raise RuntimeError(f"shards of {out.uri} ran different jobs (fingerprints {sorted(fingerprints)})")
    fp = fingerprints.pop()
    first = summaries[0]
    chunks = range(max(1, -(-first["input"]["rows"] // first["chunk_rows"])))  # as Dataset.num_chunks
    commits = out.commits()
    missing = [k for k in chunks if commits.get(k, {}).get("fingerprint") != fp
               or not out.fs.exists(out.join(part_name(k)))]
    if missing:
        raise RuntimeError(f"{out.uri}: parts missing for chunks {missing[:10]}"
                           f"{' and more' if len(missing) > 10 else ''}: a shard has not finished")
    for s in stale:  # indices this plan has not (each index has one summary file, its latest)
        out.remove(f"_shards/shard-{s['shard']['index']:05d}.json")
        out.remove(f"_shards/shard-{s['shard']['index']:05d}.job.json")
    for index in sorted(out.part_indices() | set(commits)):
        if index not in chunks:
            out.remove_part(index)
    totals = add_counts(commits[k] for k in chunks)
    seconds = max(s["seconds"] for s in summaries)
    manifest = {
        "output": out.uri,
        "parts": [part_name(k) for k in chunks],
        "counts": totals,
        "tokens": {"prompt": totals["prompt_tokens"], "output": totals["output_tokens"]},
        "seconds": seconds,
        # every shard's own rate, and the rate of the whole run as its slowest shard saw it
        "output_tokens_per_second": round(sum(s["tokens"]["output"] for s in summaries) / seconds, 1)
        if seconds else None,
        "shards": [{"index": s["shard"]["index"], "chunks": s["shard"]["chunks"], "rows": s["counts"]["rows"],
                    "seconds": s["seconds"], "output_tokens_per_second": s["output_tokens_per_second"],
                    "engine": s["engine"], "device": s["device"], "airflow": s.get("airflow")} for s in summaries],
        "engine": first["engine"],
        "model": first["model"],
        "generation": first["generation"],
        "safety": first["safety"],
        "fingerprint": fp,
        "seed": first["seed"],
        "input": first["input"],
        "chunk_rows": first["chunk_rows"],
        "started": min(s["started"] for s in summaries),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "attempts": out.attempts(),
    }
    out.write_json("_manifest.json", manifest)
    return manifest
