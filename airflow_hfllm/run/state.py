"""The output folder's job state: who owns it, what it holds, what a new attempt redoes.

State lives in the output folder only (Airflow clears XCom on every attempt). ``_job.json`` (a shard's
``_shards/shard-NNNNN.job.json``) names the job that owns the folder by its fingerprint and seed; a
job with another fingerprint rebuilds the folder, one with the same resumes it, skipping the parts it
committed (``_commits/``, see :mod:`airflow_hfllm.io.parts`). Every attempt leaves a record in
``_attempts/``. The fingerprint and these records are the compatibility surface: folders written by
earlier versions must keep resuming (``tests/unit/test_legacy_folder.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import socket
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

from airflow_hfllm.io.parts import ATTEMPTS, MANIFEST, SHARDS, STATE, OutputDir
from airflow_hfllm.run.shards import Shard

FORMAT_VERSION = 1


class Superseded(RuntimeError):
    """Another job (or another attempt that drew another seed) took the output folder over while this
    attempt ran: it stops, and what it wrote after losing the folder is removed."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def fingerprint(described) -> str:
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:32]


def shard_summary(index: int) -> str:
    return f"{SHARDS}/shard-{index:05d}.json"


@dataclass(frozen=True)
class JobState:
    """The record in ``_job.json``. Version 1 files carry no ``version`` key."""

    fingerprint: str
    seed: int
    version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, d) -> "JobState | None":
        """The record, or ``None`` when ``d`` is not one this version reads (then the folder is rebuilt)."""
        if not isinstance(d, dict) or not isinstance(d.get("fingerprint"), str) or not isinstance(d.get("seed"), int):
            return None
        version = d.get("version", 1)
        return cls(d["fingerprint"], d["seed"], version) if version == FORMAT_VERSION else None

    def to_dict(self) -> dict:
        return {"fingerprint": self.fingerprint, "seed": self.seed, "version": self.version}


class Scope:
    """The chunks one job owns: all of them, or one shard's."""

    def __init__(self, shard: dict | None = None):
        self.shard = None if shard is None else Shard.from_dict(shard)

    @property
    def state_name(self) -> str:
        return STATE if self.shard is None else f"{SHARDS}/shard-{self.shard.index:05d}.job.json"

    @property
    def summary_name(self) -> str:
        return MANIFEST if self.shard is None else shard_summary(self.shard.index)

    def chunks(self, n: int) -> range:
        if self.shard is None:
            return range(n)
        return range(min(self.shard.first_chunk, n), min(self.shard.end_chunk, n))

    def seed(self, asked: int | None) -> int | None:
        if asked is None and self.shard is not None:
            return self.shard.seed  # drawn once by the planner, shared by all shards
        return asked

    def describe(self, mine: range) -> str:
        return "" if self.shard is None else f" (shard {self.shard.index}: chunks {mine.start}-{mine.stop - 1})"


def committed_by(record: dict, fp: str, seed: int) -> bool:
    """Written by this job (records from before seeds were recorded: by fingerprint alone)."""
    return record.get("fingerprint") == fp and record.get("seed", seed) == seed


class FolderState:
    """One attempt's hold on an output folder: resume or rebuild, ownership checks, the attempt record."""

    def __init__(self, out: OutputDir, scope: Scope, log: logging.Logger | None = None):
        self.out, self.scope = out, scope
        self.log = log or logging.getLogger("airflow_hfllm")
        self.fp, self.seed = "", 0

    def resume(self, fp: str, asked_seed: int | None, n_chunks: int) -> dict[int, dict]:
        """Take the folder for the job ``fp``; the commit records of its parts already done. Stale parts
        are deleted (a shard's own parts only: other shards may be running)."""
        out, scope = self.out, self.scope
        fresh = JobState(fp, random.SystemRandom().randrange(2**31) if asked_seed is None else asked_seed)
        raw = out.read_json(scope.state_name)
        # Two writers starting together: one creates the state, the other takes its seed.
        if raw is None and not out.create_json(scope.state_name, fresh.to_dict()):
            raw = out.read_json(scope.state_name)
        state = JobState.from_dict(raw)
        if state is not None and state.fingerprint == fp:
            seed = state.seed
        else:
            if raw is not None:
                self.log.info("output %s holds another job's parts (fingerprint changed): rebuilding", out.uri)
                out.remove(MANIFEST)
                if scope.shard is None:
                    out.remove(ATTEMPTS)
                out.write_json(scope.state_name, fresh.to_dict())
            seed = fresh.seed
        self.fp, self.seed = fp, seed
        mine = scope.chunks(n_chunks)
        out.remove_temporaries()
        done = {}
        for index, record in out.commits().items():
            if scope.shard is not None and index not in mine:
                continue
            if index in mine and committed_by(record, fp, seed) and out.intact(index, record):
                done[index] = record
            else:
                if record.get("fingerprint") == fp:
                    self.log.warning("output %s: part %d is not what its commit record says (changed or "
                                     "truncated since): redoing it", out.uri, index)
                out.remove_part(index)
        for index in out.part_indices() - set(done):
            if index in mine or (scope.shard is None and index >= len(mine)):
                out.remove_part(index)
        return done

    def check_owner(self) -> None:
        """Raise :class:`Superseded` unless the folder's job state is still this job's."""
        state = JobState.from_dict(self.out.read_json(self.scope.state_name))
        if state is None or (state.fingerprint, state.seed) != (self.fp, self.seed):
            raise Superseded(f"output {self.out.uri} was taken over by another job ({self.scope.state_name} now "
                             f"says fingerprint {state and state.fingerprint}) while this attempt ran: it stops here")

    def commit(self, index: int, part, record: dict) -> dict:
        """Write a part as this job's; an attempt frozen (SIGSTOP, a paused VM) while a newer job rebuilt
        the folder must not write over it, so ownership is checked before and, since that races with
        the write, after it."""
        self.check_owner()
        record = self.out.write_part(index, part, {"fingerprint": self.fp, "seed": self.seed, **record})
        try:
            self.check_owner()
        except Superseded:
            self.out.withdraw(index, record)
            raise
        return record

    def committed(self, mine: range, done: dict[int, dict]) -> dict[int, dict]:
        """This job's parts as the folder holds them now: a part another writer committed over since (a
        concurrent attempt that drew another seed) fails the attempt."""
        records = {k: r for k, r in self.out.commits().items() if k in mine and committed_by(r, self.fp, self.seed)}
        lost = sorted(set(done) - set(records))
        if lost:
            raise Superseded(f"output {self.out.uri}: parts {lost[:10]} were committed over by another writer while "
                             "this attempt ran; the next attempt redoes them")
        return records


class Attempt:
    """This attempt's record in ``_attempts/``: when, where, what it wrote."""

    def __init__(self, out: OutputDir, scope: Scope, run_info: dict):
        self.out = out
        self.started = now()
        self.name = f"{ATTEMPTS}/attempt-{self.started.replace(':', '')}-{uuid.uuid4().hex[:8]}.json"
        self.record = {"started": self.started, "finished": None, "host": socket.gethostname(), "pid": os.getpid(),
                       "airflow": run_info, "parts_written": [],
                       "shard": None if scope.shard is None else scope.shard.index}
        out.write_json(self.name, self.record)

    def wrote(self, index: int) -> None:
        self.record["parts_written"].append(index)

    def finish(self, **facts) -> None:
        self.record.update(finished=now(), **facts)
        self.out.write_json(self.name, self.record)
