"""Sharding one input over several tasks: plan shards on chunk boundaries (the merge of their
summaries is :func:`airflow_hfllm.run.manifest.merge_shards`).

A planner task checks the input once (columns, ids unique across all files) and cuts its chunks into
contiguous ranges balanced by rows; each shard runs the ordinary job over its range, writing its own
parts and ``_shards/shard-NNNNN.json``; the merge step checks that every chunk is committed with one
fingerprint and writes ``_manifest.json``.
"""

from __future__ import annotations

import random
import uuid

from airflow_hfllm.io.dataset import Dataset


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
