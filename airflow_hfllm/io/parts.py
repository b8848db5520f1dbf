"""The output folder: parts written atomically, commit records, job state, manifest.

Layout (every name a reader must skip starts with ``_``)::

    part-00000.parquet           chunk 0's rows
    _commits/part-00000.json     written after the part: its job fingerprint and counts
    _job.json                    fingerprint and the drawn seed, so retries reuse it
    _attempts/attempt-*.json     one per attempt (start, finish, what it wrote)
    _shards/shard-NNNNN.json     a shard's summary (and .job.json, its state), in sharded runs
    _manifest.json               written last

The names are the constants below; what the job files hold is :mod:`airflow_hfllm.run.state`'s.

A part counts as done only when its commit record carries the current fingerprint and the part still
has the size and SHA-256 its record says (a part truncated or rewritten afterwards is redone). Locally
a part is written under a temporary ``_tmp-*.tmp`` name (which no ``*.parquet`` glob matches),
fsynced, and renamed into place, and the next attempt removes what a killed writer left; object stores
have no rename, but a PUT is atomic and the commit record still comes after it.

Anything else in the folder is another tool's (a Spark ``part-00000-c000.snappy.parquet``, notes): a
reader of the folder would mix it with our rows, so a job refuses such a folder unless told to remove
those files.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import re
import socket
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from airflow_hfllm.io.dataset import InputError


COMMITS, ATTEMPTS, SHARDS, STATE, MANIFEST = "_commits", "_attempts", "_shards", "_job.json", "_manifest.json"
PART = re.compile(r"part-(\d{5})\.parquet")
# What a job writes at the top of its folder; everything else is foreign.
OURS = re.compile("|".join([r"part-\d{5}\.parquet", r"_tmp-.*",
                            *(re.escape(name) for name in (COMMITS, ATTEMPTS, SHARDS, STATE, MANIFEST))]))


HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
TEMP = re.compile(r"_tmp-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-")


def _alive(pid: int) -> bool:
    if pid == os.getpid():  # this process is between attempts: its earlier writes were cut short
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


class ForeignFiles(InputError):
    """The output folder holds files this package did not write."""


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
        self._write_atomic(self.join(name), json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def create_json(self, name: str, obj: dict) -> bool:
        """Write ``name`` unless it exists; False when it does (another writer was first). Exclusive
        on local folders (a hard link fails on an existing name); on object stores a check before
        the PUT, which two writers in the same instant can both pass."""
        final = self.join(name)
        data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
        if not self.can_rename:
            if self.fs.exists(final):
                return False
            self._write_atomic(final, data)
            return True
        self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
        tmp = self._temporary(final)
        try:
            _write_synced(tmp, data)
            try:
                os.link(tmp, final)
            except FileExistsError:
                return False
            _fsync_dir(posixpath.dirname(final))
            return True
        finally:
            os.remove(tmp)

    def _temporary(self, final: str) -> str:
        # Ends in .tmp: a reader's ``*.parquet`` glob must not count a killed writer's leftover twice.
        # Names its writer (host, pid), so another attempt removes it only once that writer is dead.
        return posixpath.join(posixpath.dirname(final),
                              f"_tmp-{HOST}-{os.getpid()}-{uuid.uuid4().hex[:12]}-{posixpath.basename(final)}.tmp")

    def _write_atomic(self, final: str, data: bytes) -> None:
        parent = posixpath.dirname(final)
        self.fs.makedirs(parent, exist_ok=True)
        if not self.can_rename:
            with self.fs.open(final, "wb") as f:
                f.write(data)
            return
        tmp = self._temporary(final)
        try:
            _write_synced(tmp, data)
            os.replace(tmp, final)
            _fsync_dir(parent)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    # -- parts ---------------------------------------------------------------------------------
    def commits(self) -> dict[int, dict]:
        """Commit records by part index."""
        folder = self.join(COMMITS)
        if not self.fs.exists(folder):
            return {}
        out = {}
        for path in self.fs.ls(folder, detail=False):
            name = posixpath.basename(path)
            if re.fullmatch(r"part-\d{5}\.json", name):
                with self.fs.open(path, "rb") as f:
                    out[int(name[5:10])] = json.loads(f.read())
        return out

    def part_indices(self) -> set[int]:
        return {int(m.group(1)) for p in self.fs.glob(self.join("part-*.parquet"))
                if (m := PART.fullmatch(posixpath.basename(p)))}

    def write_part(self, index: int, table: pa.Table, record: dict) -> dict:
        """Write the part, then its commit record (``record`` plus the part's size and SHA-256)."""
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        data = buffer.getvalue()
        record = {**record, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        self._write_atomic(self.join(part_name(index)), data)
        self.write_json(f"{COMMITS}/part-{index:05d}.json", record)
        return record

    def intact(self, index: int, record: dict) -> bool:
        """The part is there with the size and checksum its commit record says (records written
        before checksums were kept: there at all)."""
        path = self.join(part_name(index))
        if not self.fs.exists(path):
            return False
        if "sha256" not in record:
            return True
        if self.fs.size(path) != record["bytes"]:
            return False
        digest = hashlib.sha256()
        with self.fs.open(path, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
        return digest.hexdigest() == record["sha256"]

    def foreign(self) -> list[str]:
        """Names at the top of the folder that no job of ours writes."""
        if not self.fs.exists(self.path):  # an object-store prefix before its first object
            return []
        return sorted(name for path in self.fs.ls(self.path, detail=False)
                      if not OURS.fullmatch(name := posixpath.basename(path.rstrip("/"))))

    def remove_foreign(self, allowed: bool) -> list[str]:
        """Remove the foreign files when ``allowed``; else refuse with their names."""
        names = self.foreign()
        if names and not allowed:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            raise ForeignFiles(
                f"output {self.uri} holds files this job did not write ({shown}); readers of the folder "
                "would mix them with its rows: use an empty folder, or replace_foreign_files=True "
                "(--replace-foreign-files) to delete them")
        for name in names:
            self.remove(name)
        return names

    def remove_part(self, index: int) -> None:
        for path in (self.join(part_name(index)), self.join(COMMITS, f"part-{index:05d}.json")):
            if self.fs.exists(path):
                self.fs.rm(path)

    def withdraw(self, index: int, record: dict) -> None:
        """Remove a part this writer committed, unless another writer has committed over it since."""
        if self.commits().get(index, {}).get("sha256") == record["sha256"]:
            self.remove_part(index)

    def remove(self, name: str) -> None:
        path = self.join(name)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def remove_temporaries(self) -> None:
        """Leftovers of writers killed mid-write: those of dead processes on this host, and from other
        hosts once they are an hour old. A live writer's (another attempt running now, a shard) stay."""
        now = time.time()
        for path in self.fs.glob(self.join("_tmp-*")) + self.fs.glob(self.join(COMMITS, "_tmp-*")):
            writer = TEMP.match(posixpath.basename(path))
            if writer is None or (writer["host"] == HOST and not _alive(int(writer["pid"]))):
                dead = True
            else:
                try:
                    dead = now - os.path.getmtime(path) > 3600
                except OSError:  # renamed or removed meanwhile
                    continue
            if dead:
                try:
                    self.fs.rm(path)
                except FileNotFoundError:
                    pass

    # -- attempts ------------------------------------------------------------------------------
    def attempts(self) -> list[dict]:
        folder = self.join(ATTEMPTS)
        if not self.fs.exists(folder):
            return []
        records = []
        for path in sorted(self.fs.ls(folder, detail=False)):
            if posixpath.basename(path).startswith("attempt-"):
                with self.fs.open(path, "rb") as f:
                    records.append(json.loads(f.read()))
        return sorted(records, key=lambda r: r.get("started", ""))


def _write_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        # On the disk before a rename or link makes it visible: after a power loss the file under
        # its final name is whole, never empty.
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable (a no-op where directories can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
