"""The output folder: parts written atomically, commit records, job state, manifest.

Layout (every name a reader must skip starts with ``_``)::

    part-00000.parquet           chunk 0's rows
    _commits/part-00000.json     written after the part: its job fingerprint and counts
    _job.json                    fingerprint and the drawn seed, so retries reuse it
    _attempts/attempt-*.json     one per attempt (start, finish, what it wrote)
    _manifest.json               written last

A part counts as done only when its commit record carries the current fingerprint. Locally a part is
written under a temporary ``_tmp-*.tmp`` name (which no ``*.parquet`` glob matches) and renamed into
place, and the next attempt removes what a killed writer left; object stores have no rename, but a
PUT is atomic and the commit record still comes after it.
"""

from __future__ import annotations

import json
import posixpath
import re
import uuid

import pyarrow as pa
import pyarrow.parquet as pq


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


class OutputDir:
    def __init__(self, fs, path: str):
        self.fs = fs
        self.path = path.rstrip("/")
        protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
        self.can_rename = any(p in ("file", "local") for p in protocols)
        fs.makedirs(self.path, exist_ok=True)

    @property
    def uri(self) -> str:
        return self.path if self.can_rename else self.fs.unstrip_protocol(self.path)

    def join(self, *names: str) -> str:
        return posixpath.join(self.path, *names)

    # -- small JSON files --------------------------------------------------------------------
    def read_json(self, name: str) -> dict | None:
        path = self.join(name)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as f:
            return json.loads(f.read())

    def write_json(self, name: str, obj: dict) -> None:
        data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
        self._write_atomic(self.join(name), lambda f: f.write(data))

    def _write_atomic(self, final: str, write) -> None:
        parent = posixpath.dirname(final)
        self.fs.makedirs(parent, exist_ok=True)
        if not self.can_rename:
            with self.fs.open(final, "wb") as f:
                write(f)
            return
        # Ends in .tmp: a reader's ``*.parquet`` glob must not count a killed writer's leftover twice.
        tmp = posixpath.join(parent, f"_tmp-{uuid.uuid4().hex}-{posixpath.basename(final)}.tmp")
        try:
            with self.fs.open(tmp, "wb") as f:
                write(f)
            self.fs.mv(tmp, final)
        finally:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)

    # -- parts ---------------------------------------------------------------------------------
    def commits(self) -> dict[int, dict]:
        """Commit records by part index."""
        folder = self.join("_commits")
        if not self.fs.exists(folder):
            return {}
        out = {}
        for path in self.fs.ls(folder, detail=False):
            name = posixpath.basename(path)
            if name.startswith("part-") and name.endswith(".json"):
                with self.fs.open(path, "rb") as f:
                    out[int(name[5:10])] = json.loads(f.read())
        return out

    def part_indices(self) -> set[int]:
        return {int(posixpath.basename(p)[5:10]) for p in self.fs.glob(self.join("part-*.parquet"))}

    def write_part(self, index: int, table: pa.Table, record: dict) -> None:
        self._write_atomic(self.join(part_name(index)), lambda f: pq.write_table(table, f))
        self.write_json(f"_commits/part-{index:05d}.json", record)

    def remove_part(self, index: int) -> None:
        for path in (self.join(part_name(index)), self.join("_commits", f"part-{index:05d}.json")):
            if self.fs.exists(path):
                self.fs.rm(path)

    def remove(self, name: str) -> None:
        path = self.join(name)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def remove_temporaries(self, parts: range | None = None) -> None:
        """Leftovers of an attempt killed mid-write; with ``parts``, only those of these part indices
        (other shards may be writing theirs right now)."""
        for path in self.fs.glob(self.join("_tmp-*")) + self.fs.glob(self.join("_commits", "_tmp-*")):
            found = re.search(r"part-(\d{5})\.", posixpath.basename(path))
            if parts is None or (found and int(found.group(1)) in parts):
                self.fs.rm(path)

    # -- attempts ------------------------------------------------------------------------------
    def attempts(self) -> list[dict]:
        folder = self.join("_attempts")
        if not self.fs.exists(folder):
            return []
        records = []
        for path in sorted(self.fs.ls(folder, detail=False)):
            if posixpath.basename(path).startswith("attempt-"):
                with self.fs.open(path, "rb") as f:
                    records.append(json.loads(f.read()))
        return sorted(records, key=lambda r: r.get("started", ""))
