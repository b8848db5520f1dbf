"""Sharding one input over several tasks: plan shards on chunk boundaries (the merge of their
summaries is :func:`airflow_hfllm.run.manifest.merge_shards`).

A planner task checks the input once (columns, ids unique across all files) and cuts its chunks into
contiguous ranges balanced by rows; each shard runs the ordinary job over its range, writing its own
parts and ``_shards/shard-NNNNN.json``; the merge step checks that every chunk is committed with one
fingerprint and writes ``_manifest.json``.
"""

from __future__ import annotations

import dataclasses
import random
import uuid
from dataclasses import dataclass

from airflow_hfllm.io.dataset import Dataset


@dataclass(frozen=True)
class Shard:
    """One entry of a plan: chunks ``[first_chunk, end_chunk)`` of the input. It travels as a dict
    (XCom, ``expand_kwargs``); :meth:`from_dict` checks it."""

    index: int
    first_chunk: int
    end_chunk: int
    rows: int
    seed: int | None = None
    plan: str | None = None  # names the plan, so the merge tells its summaries from an earlier plan's

    @classmethod
    def from_dict(cls, d) -> "Shard":
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(d, dict) or not {"index", "first_chunk", "end_chunk", "rows"} <= set(d):
            raise ValueError(f"shard must be one entry of HFShardPlanOperator's plan, got {d!r}")
        shard = cls(**{k: d[k] for k in names if k in d})
        if not 0 <= shard.first_chunk <= shard.end_chunk:
            raise ValueError(f"shard {shard.index}: chunks {shard.first_chunk}..{shard.end_chunk} is no range")
        return shard

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
            plan.append(Shard(len(plan), first, k + 1, sum(rows[first:k + 1]), seed, plan_id).to_dict())
            first = k + 1
    return plan
