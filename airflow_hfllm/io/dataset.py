"""Reading Parquet input in deterministic chunks: one file, a folder or a glob, on any fsspec filesystem.

Files are sorted by path and rows kept in file order, so chunk k always holds the same rows and a
retry or a shard can find its work again. Files whose name starts with ``_`` or ``.`` are skipped,
as pandas, pyarrow and Spark skip them in a folder.

The input's schema is decided once, from every file's footer, before anything is read: each column's
types across files are unified (null -> the other files' type, int32 -> int64, string ->
large_string), so every chunk, and every part written from it, has the same schema whichever files it
came from. A column that is null in every file becomes a string column.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


class InputError(ValueError):
    """The whole job cannot run: missing input, unreadable file, missing column, duplicate ids."""


def to_fs(location: str, fs=None):
    """``(filesystem, path)`` for a local path or fsspec URL; an explicit ``fs`` takes the path as is."""
    if fs is not None:
        return fs, location
    import fsspec.core

    return fsspec.core.url_to_fs(str(location))


@dataclass(frozen=True)
class InputFile:
    path: str
    size: int
    version: str  # etag or mtime: a changed file changes the job fingerprint
    rows: int
    schema: pa.Schema = field(compare=False, repr=False, default=None)


def _version(info: dict) -> str:
    for key in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified", "created"):
        if info.get(key) is not None:
            return str(info[key])
    return ""


def _hidden(path: str) -> bool:
    return path.rstrip("/").rsplit("/", 1)[-1].startswith(("_", "."))


def list_files(fs, path: str) -> list[str]:
    if any(c in path for c in "*?["):
        files = [p for p in fs.glob(path) if fs.isfile(p)]
    elif fs.isdir(path):
        root = path.rstrip("/")
        files = [p for p in fs.find(root) if not any(_hidden(part) for part in p[len(root):].split("/") if part)]
    elif fs.exists(path):
        files = [path]
    else:
        raise InputError(f"input not found: {path}")
    if not files:
        raise InputError(f"no input files at {path}")
    return sorted(files)


def unify(files: list[InputFile]) -> tuple[pa.Schema, dict[str, list[tuple[str, pa.DataType]]]]:
    """One schema over all files, column by column, and the columns whose types do not unify (with
    each file's type): those can't be read into one output schema."""
    types: dict[str, list[tuple[str, pa.DataType]]] = {}
    for file in files:
        for f in file.schema:
            types.setdefault(f.name, []).append((file.path, f.type))
    fields, conflicts = [], {}
    for name, seen in types.items():
        try:
            typ = pa.unify_schemas([pa.schema([(name, t)]) for _, t in seen], promote_options="permissive"
                                   ).field(name).type
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            conflicts[name] = seen
            continue
        fields.append(pa.field(name, pa.string() if pa.types.is_null(typ) else typ))
    return pa.schema(fields), conflicts


def describe_conflict(column: str, seen: list[tuple[str, pa.DataType]]) -> str:
    by_type: dict[str, list[str]] = {}
    for path, typ in seen:
        by_type.setdefault(str(typ), []).append(path)
    shown = "; ".join(f"{typ} in {', '.join(paths[:3])}{' and %d more' % (len(paths) - 3) if len(paths) > 3 else ''}"
                      for typ, paths in by_type.items())
    return f"column {column!r} has types that cannot be unified across input files: {shown}"


class Dataset:
    """The input of one job. :meth:`open` checks everything that can be checked up front."""

    def __init__(self, fs, location: str, files: list[InputFile], folder: str | None = None):
        self.fs = fs
        self.location = location
        self.files = files
        self.folder = folder  # the input folder, when the location is one: all files below it are input
        self.schema, self.conflicts = unify(files)

    def overlaps(self, fs, folder: str) -> str | None:
        """Why an output ``folder`` on ``fs`` would be read back as input, or None."""
        if fs.protocol != self.fs.protocol:
            return None
        folder = folder.rstrip("/") + "/"
        if self.folder is not None and (folder.startswith(self.folder.rstrip("/") + "/")):
            return f"output {folder.rstrip('/')} is inside the input folder {self.folder}"
        inside = [f.path for f in self.files if f.path.startswith(folder)]
        if inside:
            return f"input files are inside the output folder {folder.rstrip('/')} ({inside[0]})"
        return None

    @classmethod
    def open(cls, location: str, fs=None, *, required: Sequence[str] = (), string_columns: Sequence[str] = (),
             id_column: str | None = "id", check_ids: bool = True) -> "Dataset":
        """``check_ids=False`` keeps the id column's type check but skips reading every id for
        duplicates: for shards, whose planner checked the whole input once."""
        fs, path = to_fs(location, fs)
        files = []
        for file in list_files(fs, path):
            try:
                with fs.open(file, "rb") as f:
                    meta = pq.ParquetFile(f, pre_buffer=False).metadata  # see _read
                    file_schema = meta.schema.to_arrow_schema()
            except Exception as exc:
                raise InputError(f"{file}: not a readable Parquet file ({type(exc).__name__}: {exc})") from None
            for column in required:
                if column not in file_schema.names:
                    raise InputError(
                        f"{file}: missing column {column!r} (columns: {', '.join(file_schema.names)})"
                    )
            for column in string_columns:
                typ = file_schema.field(column).type
                if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_null(typ)):
                    raise InputError(f"{file}: column {column!r} is {typ}, expected string")
            if id_column:
                typ = file_schema.field(id_column).type
                if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_integer(typ)):
                    raise InputError(f"{file}: id column {id_column!r} is {typ}, expected string or integer")
            files.append(InputFile(file, int(fs.size(file)), _version(fs.info(file)), meta.num_rows, file_schema))
        dataset = cls(fs, location, files, path if not any(c in path for c in "*?[") and fs.isdir(path) else None)
        for column in dict.fromkeys([*([id_column] if id_column else []), *required]):
            if column in dataset.conflicts:
                raise InputError(describe_conflict(column, dataset.conflicts[column]))
        if id_column and check_ids:
            dataset.check_ids(id_column)
        return dataset

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    def num_chunks(self, chunk_rows: int) -> int:
        """At least one: an input without rows still gives one (empty) part, so the output folder has
        its schema for readers."""
        return max(1, -(-self.rows // chunk_rows))

    def chunk_sizes(self, chunk_rows: int) -> list[int]:
        """Rows in each chunk (the last may be shorter)."""
        return [min(chunk_rows, self.rows - k * chunk_rows) for k in range(self.num_chunks(chunk_rows))]

    def _read(self, file: InputFile, columns: Sequence[str] | None) -> pa.Table:
        """The file's rows in the dataset's schema: columns cast to their unified types, and null for
        a column this file lacks.

        Read on this thread only, so that no pyarrow pool thread holds the reader once this returns:
        ``pq.read_table`` goes through ``pyarrow.dataset``, whose scanner opens the file on pyarrow's
        thread pools (whatever ``use_threads`` says), and ``pre_buffer`` and ``use_threads`` read and
        decode on them. A pool thread could then drop the last reference to the reader after the
        read returned; freeing the Python file it wraps takes the GIL, and a thread that takes the GIL
        while the interpreter finalizes exits mid-destructor: "terminate called without an active
        exception" and SIGABRT, on a quick exit after an input error (duplicate ids)."""
        names = list(columns) if columns else self.schema.names
        for name in names:
            if name in self.conflicts:
                raise InputError(describe_conflict(name, self.conflicts[name]))
        have = [n for n in names if n in file.schema.names]
        with self.fs.open(file.path, "rb") as f:
            table = pq.ParquetFile(f, pre_buffer=False).read(columns=have, use_threads=False)
        target = pa.schema([self.schema.field(n) for n in names])
        arrays = [table.column(n) if n in have else pa.nulls(table.num_rows, target.field(n).type) for n in names]
        try:
            return pa.table(arrays, names=names).cast(target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:  # e.g. an int64 id past a uint64's range
            raise InputError(f"{file.path}: cannot read as the input's schema {target}: {exc}") from None

    def _empty(self, columns: Sequence[str]) -> pa.Table:
        return pa.schema([self.schema.field(n) for n in columns]).empty_table()

    def check_ids(self, id_column: str) -> None:
        seen: dict = {}
        duplicates: dict = {}
        for file in self.files:
            ids = self._read(file, [id_column]).column(id_column)
            nulls = ids.null_count
            if nulls:
                row = pc.index(pc.is_null(ids), True).as_py()
                raise InputError(f"{file.path}: column {id_column!r} has {nulls} null ids (first at row {row})")
            for value in ids.to_pylist():
                if value in seen:
                    duplicates.setdefault(value, {seen[value]}).add(file.path)
                else:
                    seen[value] = file.path
        if duplicates:
            shown = ", ".join(f"{k!r} ({', '.join(sorted(v))})" for k, v in list(duplicates.items())[:5])
            more = f" and {len(duplicates) - 5} more" if len(duplicates) > 5 else ""
            raise InputError(f"duplicate ids in column {id_column!r}: {shown}{more}")

    def chunks(self, chunk_rows: int, columns: Sequence[str], wanted: set[int] | None = None
               ) -> Iterator[tuple[int, pa.Table]]:
        """``(k, table)`` for each chunk k of ``chunk_rows`` rows (the last may be shorter), in order;
        with ``wanted``, only those chunks (files holding none of their rows are not read)."""
        pending: list[pa.Table] = []
        pending_rows = 0
        index = 0
        offset = 0  # global row number of the first row of the current file
        for file in self.files:
            first_chunk, last_chunk = offset // chunk_rows, (offset + file.rows - 1) // chunk_rows
            needed = file.rows and (wanted is None or any(k in wanted for k in range(first_chunk, last_chunk + 1)))
            table = self._read(file, columns) if needed else None
            start = 0
            while start < file.rows:
                take = min(chunk_rows - pending_rows, file.rows - start)
                if table is not None:
                    pending.append(table.slice(start, take))
                pending_rows += take
                start += take
                if pending_rows == chunk_rows:
                    if wanted is None or index in wanted:
                        yield index, _concat(pending)
                    pending, pending_rows, index = [], 0, index + 1
            offset += file.rows
        if (pending_rows or not self.rows) and (wanted is None or index in wanted):
            yield index, _concat(pending) if pending else self._empty(columns)

    def fingerprint(self, content: bool = False) -> list[dict]:
        """What identifies the input: each file's path, size and version (etag, or mtime for local
        files); with ``content``, a SHA-256 of its bytes instead of the version, for inputs rewritten
        in place with size and mtime kept (``cp -p``, ``rsync -t``)."""
        if not content:
            return [{"path": f.path, "size": f.size, "version": f.version} for f in self.files]
        return [{"path": f.path, "size": f.size, "sha256": self._sha256(f)} for f in self.files]

    def _sha256(self, file: InputFile) -> str:
        digest = hashlib.sha256()
        with self.fs.open(file.path, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
        return digest.hexdigest()


def _concat(tables: list[pa.Table]) -> pa.Table:
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)
