"""Generation jobs: read chunk -> check prompts -> generate -> check outputs -> write part -> manifest.

Plain Python: the operators, the CLI and a notebook all build a :class:`TextJob` or a :class:`VisionJob`
and call ``run()``. State lives in the output folder only (Airflow clears XCom on every attempt), so a
retry skips the parts an earlier attempt committed with the same fingerprint and redoes at most the
chunk in flight.

:class:`Job` holds what every kind shares: the chunk loop, resume and rebuild, safety checks on
prompts and outputs, per-row errors, parts, manifest, progress and cancellation. A kind supplies the
hooks: how to load its model (:meth:`Job._load`), its generator (:meth:`Job._generator`), how a row
becomes messages (:meth:`Job._prepare`) and a generation request (:meth:`Job._build_request`), and what
it adds to the fingerprint and the manifest.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, ClassVar, Sequence

import pyarrow as pa

from airflow_hfllm.engine.fast import FastEngine, unsupported_reason
from airflow_hfllm.engine.generate import BatchedGenerator, Cancelled, Request
from airflow_hfllm.config import HubOptions
from airflow_hfllm.engine.loading import get_model
from airflow_hfllm.engine.prompts import PromptBuilder, RowError, checked_text, context_limit, encode
from airflow_hfllm.config import GenerationParams, ModelSpec
from airflow_hfllm.io.dataset import Dataset, InputError, to_fs
from airflow_hfllm.io.manifest import OUTPUT_COLUMNS, add_counts, count, fingerprint, output_schema
from airflow_hfllm.io.parts import OutputDir, part_name
from airflow_hfllm.safety import SafetyChecker, judge, make_checker

__all__ = ["Cancelled", "ErrorRateExceeded", "InputError", "Job", "Superseded", "TextJob"]

FORMAT_VERSION = 1
log = logging.getLogger("airflow_hfllm")


class Superseded(RuntimeError):
    """Another job (or another attempt that drew another seed) took the output folder over while this
    attempt ran: it stops, and what it wrote after losing the folder is removed."""


class ErrorRateExceeded(RuntimeError):
    """Everything was written, but too many rows ended in ``error``; ``manifest`` is the run's, as written."""

    def __init__(self, message: str, manifest: dict | None = None):
        super().__init__(message)
        self.manifest = manifest


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def python_rows(table: pa.Table) -> tuple[list[dict], dict[int, str]]:
    """The table's rows as dicts, and what is wrong with rows whose values Python can't take (a string
    that is not valid UTF-8): those rows' bad values are None, and they end in ``error``, the others
    run."""
    try:
        return table.to_pylist(), {}
    except UnicodeDecodeError:
        pass
    columns, bad = {}, {}
    for name in table.column_names:
        column = table.column(name)
        try:
            columns[name] = column.to_pylist()
        except UnicodeDecodeError:
            values = []
            for i in range(len(column)):
                try:
                    values.append(column[i].as_py())
                except UnicodeDecodeError:
                    values.append(None)
                    bad.setdefault(i, f"column {name!r} holds a string that is not valid UTF-8")
            columns[name] = values
    return [dict(zip(columns, values)) for values in zip(*columns.values())], bad


def _committed_by(record: dict, fp: str, seed: int) -> bool:
    """Written by this job (records from before seeds were recorded: by fingerprint alone)."""
    return record.get("fingerprint") == fp and record.get("seed", seed) == seed


def chunk_seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:6], "big")


class Progress:
    """Logs rows done/total, rows/s, output tok/s, ETA and unsafe counts every ``every`` seconds.
    Counts and rates only: never prompt or output text."""

    def __init__(self, logger, total: int, done: int, every: float):
        self.log, self.total, self.done, self.every = logger, total, done, every
        self.started = self.last = time.monotonic()
        self.rows = self.tokens = 0
        self.unsafe_prompt = self.unsafe_output = self.errors = 0
        self.logged = None  # the counts of the last line

    def batch(self, rows: int, tokens: int) -> None:
        self.rows += rows
        self.tokens += tokens
        self.maybe_log()

    def skipped(self, rows: int) -> None:
        """Rows done without reaching the generator (blocked, bad); the generator counts the rest."""
        self.rows += rows

    def maybe_log(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.every:
            return
        counts = (self.rows, self.unsafe_prompt, self.unsafe_output, self.errors)
        # A batch and then its chunk's commit, or the last commit and then the run's end, would
        # otherwise log the same line twice.
        if counts == self.logged:
            return
        self.last, self.logged = now, counts
        elapsed = max(now - self.started, 1e-9)
        rate = self.rows / elapsed
        done = min(self.done + self.rows, self.total)
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        self.log.info(
            "progress: %d/%d rows (%.0f%%), %.1f rows/s, %.0f output tok/s, ETA %.0f s, "
            "unsafe prompts %d, unsafe outputs %d, errors %d",
            done, self.total, 100 * done / max(self.total, 1), rate, self.tokens / elapsed, eta,
            self.unsafe_prompt, self.unsafe_output, self.errors,
        )


@dataclass
class _Chunk:
    """One input chunk on its way to becoming a part: the output columns, filled in as it goes."""

    table: pa.Table
    n: int
    keys: list
    requests: dict = field(default_factory=dict)
    order: list = field(default_factory=list)
    completions: dict = field(default_factory=dict)
    prompt_texts: dict = field(default_factory=dict)

    def __post_init__(self):
        n = self.n
        self.output, self.finish, self.error = [None] * n, [None] * n, [None] * n
        self.prompt_safe, self.output_safe = [None] * n, [None] * n
        self.prompt_safety, self.output_safety = [[] for _ in range(n)], [[] for _ in range(n)]
        self.prompt_tokens, self.output_tokens = [0] * n, [0] * n

    def fail(self, i: int, message: str) -> None:
        self.error[i], self.finish[i] = message, "error"


@dataclass
class Job:
    """What every generation job shares; see :class:`TextJob` and :class:`VisionJob`.

    :param input: Parquet file, folder or glob (local path or fsspec URL; with ``input_fs``, a path
        on that filesystem).
    :param output: output folder (likewise, with ``output_fs``).
    :param model: what to generate with.
    :param params: generation parameters (``seed=None`` draws one seed, kept for retries).
    :param id_column: unique join key.
    :param prompt_column: string prompt; ``messages_column`` takes chat messages instead.
    :param prompt_template: Jinja over the row, e.g. ``"Summarise: {{ row.text }}"``.
    :param template_context: more variables the template reads (the operator's Airflow context:
        ``{{ ds }}``); the values it reads are part of the fingerprint.
    :param keep_columns: input columns copied to the output.
    :param chunk_rows: rows per input chunk = per output part (the unit of retry).
    :param batch_size: cap on rows per GPU batch; a token budget does the rest.
    :param max_prompt_tokens: longest prompt accepted (the spec's ``max_padding_length``); default:
        the model's context minus the row's ``max_new_tokens``.
    :param safety_checkers: checkers or specs like ``"salesforce:MODEL"``.
    :param on_unsafe_output: ``redact`` (output null) or ``keep``.
    :param max_error_rate: fail after writing when more than this share of rows ended in error.
    :param engine: ``auto`` (the fast engine on a GPU when the model allows, else batched
        ``generate()``), ``fast`` or ``batched``.
    :param input_fingerprint: how a changed input is noticed: ``metadata`` (each file's size and
        version: the object store's etag, a local file's mtime) or ``content`` (a SHA-256 of every
        file's bytes, read on each run: for files rewritten in place with size and mtime kept).
    :param replace_foreign_files: delete files in the output folder that this package did not write
        (off: such a folder is refused, since its readers would mix those files with the rows).
    """

    input: str
    output: str
    model: ModelSpec
    params: GenerationParams = field(default_factory=GenerationParams)
    input_fs: Any = None
    output_fs: Any = None
    id_column: str = "id"
    prompt_column: str | None = "prompt"
    messages_column: str | None = None
    max_new_tokens_column: str = "max_new_tokens"
    system_prompt: str | None = None
    prompt_template: str | None = None
    template_context: dict = field(default_factory=dict, repr=False)
    keep_columns: Sequence[str] = ()
    chunk_rows: int = 1000
    batch_size: int | None = None
    token_budget: int | None = None
    max_prompt_tokens: int | None = None
    safety_checkers: Sequence[Any] = ()
    on_unsafe_output: str = "redact"
    max_error_rate: float = 0.05
    engine: str = "auto"
    replace_foreign_files: bool = False
    input_fingerprint: str = "metadata"
    shard: dict | None = None
    hub: HubOptions | None = None
    run_info: dict = field(default_factory=dict)
    logger: Any = None
    progress_every: float = 5.0
    stop_event: threading.Event = field(default_factory=threading.Event)

    kind: ClassVar[str] = "generation"

    def __post_init__(self):
        if self.engine not in ("auto", "fast", "batched"):
            raise ValueError(f"engine must be 'auto', 'fast' or 'batched', got {self.engine!r}")
        if self.on_unsafe_output not in ("redact", "keep"):
            raise ValueError(f"on_unsafe_output must be 'redact' or 'keep', got {self.on_unsafe_output!r}")
        if self.chunk_rows < 1:
            raise ValueError("chunk_rows must be >= 1")
        if self.input_fingerprint not in ("metadata", "content"):
            raise ValueError(f"input_fingerprint must be 'metadata' or 'content', got {self.input_fingerprint!r}")
        for name in ("batch_size", "max_prompt_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or None), got {getattr(self, name)}")
        if not 0 <= self.max_error_rate <= 1:
            raise ValueError("max_error_rate must be between 0 and 1")
        for column in self.keep_columns:
            if column in OUTPUT_COLUMNS:
                raise ValueError(f"keep column {column!r} has the name of an output column "
                                 f"({', '.join(OUTPUT_COLUMNS)}): rename it in the input to keep it")
        if len(set(self.keep_columns)) != len(self.keep_columns):
            raise ValueError(f"keep columns named more than once: {list(self.keep_columns)}")
        self.log = self.logger or log
        self.prompts = PromptBuilder(self.prompt_column, self.messages_column, self.system_prompt,
                                     self.prompt_template, self.template_context)
        self.checkers: list[SafetyChecker] = [make_checker(c, self.hub) for c in self.safety_checkers]

    def cancel(self) -> None:
        """Ask the job to stop between batches; ``run()`` then raises :class:`Cancelled`."""
        self.stop_event.set()

    # -- hooks of each kind --------------------------------------------------------------------
    def _load(self):
        """The loaded model (through the shared model cache)."""
        raise NotImplementedError

    def _generator(self, loaded, progress: Progress):
        """What turns the chunk's requests into completions (``generate(requests, seed, keys)``)."""
        raise NotImplementedError

    def _prepare(self, row: dict) -> Any:
        """The row's prompt (what :meth:`_checked_text` and :meth:`_build_request` read); raise
        :class:`RowError` for a bad row."""
        return self.prompts.messages(row)

    def _checked_text(self, prepared) -> str:
        """What the prompt safety check reads."""
        return checked_text(prepared)

    def _build_request(self, row: dict, prepared, loaded) -> Request:
        """The row's generation request; its ``input_ids`` length is the row's ``prompt_tokens``. Raise
        :class:`RowError` for a bad row."""
        raise NotImplementedError

    def _fingerprint_extra(self) -> dict:
        """What else changes this kind's outputs (added to the fingerprint when not empty)."""
        return {}

    def _manifest_extra(self) -> dict:
        """Keys this kind adds to the manifest."""
        return {}

    # -- setup ---------------------------------------------------------------------------------
    def _required_columns(self) -> list[str]:
        return [self.id_column, *self.prompts.input_columns(), *self.keep_columns]

    def open_input(self) -> Dataset:
        required = self._required_columns()
        strings = [self.prompt_column] if required and self.prompt_column in self.prompts.input_columns() else []
        # A shard's planner checked ids across the whole input; every shard re-reading them is waste.
        dataset = Dataset.open(self.input, self.input_fs, required=required, string_columns=strings,
                               id_column=self.id_column, check_ids=self.shard is None)
        self.prompts.check_input(dataset)
        return dataset

    @property
    def _state_name(self) -> str:
        return "_job.json" if self.shard is None else f"_shards/shard-{self.shard['index']:05d}.job.json"

    def _check_owner(self, out: OutputDir, fp: str, seed: int) -> None:
        """Raise :class:`Superseded` unless the folder's job state is still this job's."""
        state = out.read_json(self._state_name) or {}
        if (state.get("fingerprint"), state.get("seed")) != (fp, seed):
            raise Superseded(f"output {out.uri} was taken over by another job ({self._state_name} now says "
                             f"fingerprint {state.get('fingerprint')}) while this attempt ran: it stops here")

    def _fingerprint(self, dataset: Dataset, seed) -> str:
        described = {
            "format": FORMAT_VERSION,
            "input": dataset.fingerprint(content=self.input_fingerprint == "content"),
            "model": self.model.to_dict(),
            "params": self.params.replace(seed=seed).to_dict(),
            "safety": [c.fingerprint() for c in self.checkers],
            "on_unsafe_output": self.on_unsafe_output,
            "columns": [self.id_column, self.prompt_column, self.messages_column, self.max_new_tokens_column,
                        list(self.keep_columns)],
            "prompt": self.prompts.fingerprint(),
            "chunk_rows": self.chunk_rows,
            "max_prompt_tokens": self.max_prompt_tokens,
        }
        extra = self._fingerprint_extra()
        if extra:  # a text job's fingerprint stays what it always was
            described[self.kind] = extra
        return fingerprint(described)

    def _chunks(self, dataset: Dataset) -> range:
        """The chunk indices this job owns: all of them, or its shard's."""
        n = dataset.num_chunks(self.chunk_rows)
        if self.shard is None:
            return range(n)
        return range(min(self.shard["first_chunk"], n), min(self.shard["end_chunk"], n))

    def _resume(self, out: OutputDir, dataset: Dataset) -> tuple[str, int, dict[int, dict]]:
        """The fingerprint, the seed, and the parts already done; stale parts are deleted (a shard's
        own parts only: other shards may be running)."""
        seed = self.params.seed
        if seed is None and self.shard is not None and self.shard.get("seed") is not None:
            seed = self.shard["seed"]  # drawn once by the planner, shared by all shards
        fp = self._fingerprint(dataset, seed if seed is not None else "auto")
        fresh = {"fingerprint": fp, "seed": random.SystemRandom().randrange(2**31) if seed is None else seed}
        state = out.read_json(self._state_name)
        # Two writers starting together: one creates the state, the other takes its seed.
        if state is None and not out.create_json(self._state_name, fresh):
            state = out.read_json(self._state_name)
        if state and state.get("fingerprint") == fp:
            seed = state["seed"]
        else:
            if state:
                self.log.info("output %s holds another job's parts (fingerprint changed): rebuilding", out.uri)
                out.remove("_manifest.json")
                if self.shard is None:
                    out.remove("_attempts")
                out.write_json(self._state_name, fresh)
            seed = fresh["seed"]
        mine = self._chunks(dataset)
        out.remove_temporaries()
        done = {}
        for index, record in out.commits().items():
            if self.shard is not None and index not in mine:
                continue
            if index in mine and _committed_by(record, fp, seed) and out.intact(index, record):
                done[index] = record
            else:
                if record.get("fingerprint") == fp:
                    self.log.warning("output %s: part %d is not what its commit record says (changed or "
                                     "truncated since): redoing it", out.uri, index)
                out.remove_part(index)
        for index in out.part_indices() - set(done):
            if index in mine or (self.shard is None and index >= len(mine)):
                out.remove_part(index)
        return fp, seed, done

    # -- run -----------------------------------------------------------------------------------
    def run(self) -> dict:
        started, t0 = _now(), time.monotonic()
        out_fs, out_path = to_fs(self.output, self.output_fs)
        if out_fs.isfile(out_path):
            raise InputError(f"output {out_path} is a file, not a folder")
        dataset = self.open_input()
        overlap = dataset.overlaps(out_fs, out_path)
        if overlap:  # a retry would read this run's parts as input
            raise InputError(f"{overlap}: put the output outside the input")
        out = OutputDir(out_fs, out_path)
        removed = out.remove_foreign(self.replace_foreign_files)
        if removed:
            self.log.info("output %s: removed %d files this job did not write (replace_foreign_files)",
                          out.uri, len(removed))
        fp, seed, done = self._resume(out, dataset)
        n_chunks = dataset.num_chunks(self.chunk_rows)
        mine = self._chunks(dataset)
        todo = set(mine) - set(done)
        self.log.info("input: %d files, %d rows, %d chunks of %d rows%s; %d chunks already done, %d to do",
                      len(dataset.files), dataset.rows, n_chunks, self.chunk_rows,
                      f" (shard {self.shard['index']}: chunks {mine.start}-{mine.stop - 1})" if self.shard else "",
                      len(done), len(todo))
        attempt_name = f"_attempts/attempt-{started.replace(':', '')}-{uuid.uuid4().hex[:8]}.json"
        attempt = {"started": started, "finished": None, "host": socket.gethostname(), "pid": os.getpid(),
                   "airflow": self.run_info, "parts_written": [],
                   "shard": None if self.shard is None else self.shard["index"]}
        out.write_json(attempt_name, attempt)

        load_seconds, device, peak, generator, engine_name = 0.0, "none", None, None, None
        this_attempt = dict.fromkeys(("rows", "output_tokens"), 0)
        gen_seconds = 0.0
        if todo:
            out.remove("_manifest.json")  # it describes parts about to be rewritten
            t_load = time.monotonic()
            loaded = self._load()
            sizes = dataset.chunk_sizes(self.chunk_rows)
            todo_rows = sum(sizes[k] for k in todo)
            for checker in self.checkers:
                checker.expect(2 * todo_rows)  # a prompt check and an output check per row, at most
                checker.load()
            load_seconds = time.monotonic() - t_load
            device = str(loaded.device)
            self._reset_peak(loaded)
            done_rows = sum(r["counts"]["rows"] for r in done.values())
            progress = Progress(self.log, dataset.rows, done_rows, self.progress_every)
            generator = self._generator(loaded, progress)
            columns = list(dict.fromkeys([self.id_column, *self._row_columns(dataset), *self.keep_columns]))
            t_gen = time.monotonic()
            def commit(index: int, part: pa.Table) -> None:
                counts = count(part.column("finish_reason").to_pylist(), part.column("prompt_tokens").to_pylist(),
                               part.column("output_tokens").to_pylist())
                record = {"fingerprint": fp, "seed": seed, "part": part_name(index), "counts": counts,
                          "written": _now()}
                # An attempt frozen (SIGSTOP, a paused VM) while a newer job rebuilt the folder must not
                # write over it; checked again after the write, since the first check races with it.
                self._check_owner(out, fp, seed)
                record = out.write_part(index, part, record)
                try:
                    self._check_owner(out, fp, seed)
                except Superseded:
                    out.withdraw(index, record)
                    raise
                done[index] = record
                attempt["parts_written"].append(index)
                this_attempt["rows"] += counts["rows"]
                this_attempt["output_tokens"] += counts["output_tokens"]
                progress.maybe_log()

            chunks = dataset.chunks(self.chunk_rows, columns, wanted=todo)
            if isinstance(generator, FastEngine):
                self._stream(chunks, loaded, generator, seed, fp, progress, commit)
            else:
                for index, table in chunks:
                    if self.stop_event.is_set():
                        raise Cancelled("stopped between chunks")
                    chunk = self._start_chunk(table, loaded, progress)
                    completions = generator.generate([chunk.requests[i] for i in chunk.order],
                                                     seed=chunk_seed(seed, index),
                                                     keys=[chunk.keys[i] for i in chunk.order]) if chunk.order else []
                    chunk.completions.update(zip(chunk.order, completions))
                    commit(index, self._finish_chunk(chunk, progress, self._schema_metadata(fp, seed, index)))
            gen_seconds = time.monotonic() - t_gen
            progress.maybe_log(force=True)
            peak = self._peak(loaded)
            engine_name = "fast" if isinstance(generator, FastEngine) else "batched-generate"

        attempt.update(finished=_now(), seconds=round(time.monotonic() - t0, 3), **this_attempt)
        out.write_json(attempt_name, attempt)
        self._check_owner(out, fp, seed)
        done = self._committed(out, mine, fp, seed, done)
        totals = add_counts(done[k] for k in sorted(done))
        manifest = {
            "output": out.uri,
            "parts": [part_name(k) for k in sorted(done)],
            "checksums": {part_name(k): done[k].get("sha256") for k in sorted(done)},
            "counts": totals,
            "tokens": {"prompt": totals["prompt_tokens"], "output": totals["output_tokens"]},
            "seconds": round(time.monotonic() - t0, 3),
            "generate_seconds": round(gen_seconds, 3),
            "output_tokens_per_second": round(this_attempt["output_tokens"] / gen_seconds, 1) if gen_seconds else None,
            "load_seconds": round(load_seconds, 3),
            "compile_seconds": round(getattr(generator, "capture_seconds", 0.0), 3) if todo else 0.0,
            "engine_stats": generator.stats() if hasattr(generator, "stats") else None,
            "peak_gpu_memory_bytes": peak,
            "engine": engine_name,
            "device": device,
            "model": self.model.to_dict(),
            "generation": self.params.replace(seed=seed).to_dict(),
            "safety": [c.describe() for c in self.checkers],
            "fingerprint": fp,
            "seed": seed,
            "input": {"location": str(self.input), "files": len(dataset.files), "rows": dataset.rows},
            "chunk_rows": self.chunk_rows,
            "started": started,
            "finished": _now(),
            "attempts": out.attempts(),
            "airflow": self.run_info or None,
            **self._manifest_extra(),
        }
        if self.shard is not None:
            # A shard's summary; the merge step writes _manifest.json once every shard is done.
            manifest["shard"] = {**self.shard, "chunks": [mine.start, mine.stop]}
            manifest["attempts"] = [a for a in manifest["attempts"] if a.get("shard") == self.shard["index"]]
            out.write_json(f"_shards/shard-{self.shard['index']:05d}.json", manifest)
        else:
            out.write_json("_manifest.json", manifest)
        self.log.info("wrote %d parts, %d rows (%d generated, %d unsafe prompts, %d unsafe outputs, %d errors) to %s",
                      len(done), totals["rows"], totals["generated"], totals["unsafe_prompt"],
                      totals["unsafe_output"], totals["errors"], out.uri)
        if totals["rows"] and totals["errors"] / totals["rows"] > self.max_error_rate:
            raise ErrorRateExceeded(
                f"{totals['errors']} of {totals['rows']} rows ended in error, over max_error_rate="
                f"{self.max_error_rate}; see the 'error' column in {out.uri}", manifest)
        return manifest

    def _committed(self, out: OutputDir, mine: range, fp: str, seed: int, done: dict[int, dict]) -> dict[int, dict]:
        """This job's parts as the folder holds them now, for the manifest: a part another writer
        committed over since (a concurrent attempt that drew another seed) fails the attempt."""
        records = {k: r for k, r in out.commits().items() if k in mine and _committed_by(r, fp, seed)}
        lost = sorted(set(done) - set(records))
        if lost:
            raise Superseded(f"output {out.uri}: parts {lost[:10]} were committed over by another writer while this "
                             "attempt ran; the next attempt redoes them")
        return records

    def _row_columns(self, dataset: Dataset) -> list[str]:
        if self.prompt_template:  # the template may read any column
            return list(dataset.schema.names)
        columns = self.prompts.input_columns()
        if self.max_new_tokens_column in dataset.schema.names:
            columns.append(self.max_new_tokens_column)
        return columns

    def _schema_metadata(self, fp: str, seed: int, index: int) -> dict:
        return {"fingerprint": fp, "part": index, "model": self.model.to_dict(),
                "generation": self.params.replace(seed=seed).to_dict(), "format": FORMAT_VERSION}

    def _fast_or(self, loaded, progress: Progress, fast_class, batched, **fast_kwargs):
        """The fast engine where the model and device allow (or ``engine='fast'`` asks), else ``batched()``;
        the log says which and why."""
        reason = "asked for" if self.engine == "batched" else unsupported_reason(loaded, fast_class.vision)
        if reason is None and self.engine == "auto" and loaded.device.type != "cuda":
            reason = "no GPU (the fast engine's CUDA graphs need one)"
        if reason is None:
            self.log.info("engine: fast (continuous batching, static KV cache%s) on %s",
                          ", CUDA graphs" if loaded.device.type == "cuda" else "", loaded.device)
            return fast_class(loaded, self.params, slots=self.batch_size, should_stop=self.stop_event.is_set,
                              on_batch=progress.batch, **fast_kwargs)
        if self.engine == "fast":
            raise ValueError(f"engine='fast' cannot run {self.model.model}: {reason}")
        generator = batched()
        self.log.info("engine: batched generate() on %s (batch cap %d rows, token budget %d): %s",
                      loaded.device, generator.max_batch_size, generator.token_budget, reason)
        return generator

    # -- chunks ------------------------------------------------------------------------------
    def _stream(self, chunks, loaded, engine: FastEngine, seed: int, fp: str, progress: Progress, commit) -> None:
        """The fast engine over all chunks as one stream of rows, so its batch stays full across chunk
        boundaries; a part is written as soon as all rows of its chunk are done."""
        open_chunks: dict[int, _Chunk] = {}

        def rows():
            for index, table in chunks:
                if self.stop_event.is_set():
                    raise Cancelled("stopped between chunks")
                chunk = open_chunks[index] = self._start_chunk(table, loaded, progress)
                if not chunk.order:  # nothing to generate (all rows unsafe or bad): written at once
                    flush(index)
                for i in chunk.order:
                    yield (index, i), chunk.requests[i], chunk.keys[i]

        def flush(index: int) -> None:
            chunk = open_chunks.pop(index)
            commit(index, self._finish_chunk(chunk, progress, self._schema_metadata(fp, seed, index)))

        for (index, i), completion in engine.stream(rows(), seed=seed):
            chunk = open_chunks[index]
            chunk.completions[i] = completion
            if len(chunk.completions) == len(chunk.order):
                flush(index)
        if open_chunks:  # every row the engine took must come back
            raise RuntimeError(f"fast engine returned no result for rows of chunks {sorted(open_chunks)}")

    def _start_chunk(self, table: pa.Table, loaded, progress: Progress) -> "_Chunk":
        """Everything before generation: prompts, prompt checks, token limits."""
        rows, bad = python_rows(table)
        chunk = _Chunk(table, len(rows), table.column(self.id_column).to_pylist())
        prepared: list = [None] * chunk.n
        for i, row in enumerate(rows):
            try:
                if i in bad:
                    raise RowError(bad[i])
                prepared[i] = self._prepare(row)
            except RowError as exc:
                chunk.fail(i, str(exc))
        live = [i for i in range(chunk.n) if chunk.finish[i] is None]
        chunk.prompt_texts = {i: self._checked_text(prepared[i]) for i in live}

        if self.checkers:
            for i, judgement in zip(live, judge(self.checkers, [chunk.prompt_texts[i] for i in live], "prompt")):
                chunk.prompt_safety[i] = [v.to_dict() for v in judgement.verdicts]
                chunk.prompt_safe[i] = judgement.safe
                if judgement.error:
                    chunk.fail(i, judgement.error)
                elif judgement.safe is False:
                    chunk.finish[i] = "unsafe_prompt"
                    progress.unsafe_prompt += 1
            live = [i for i in live if chunk.finish[i] is None]

        limit_model = context_limit(loaded.model)
        for i in live:
            try:
                request = self._build_request(rows[i], prepared[i], loaded)
            except RowError as exc:
                chunk.fail(i, str(exc))
                continue
            n = chunk.prompt_tokens[i] = len(request.input_ids)
            if self.max_prompt_tokens and n > self.max_prompt_tokens:
                chunk.fail(i, f"prompt has {n} tokens, over the limit of {self.max_prompt_tokens} (max_prompt_tokens)")
                continue
            if limit_model:
                if n >= limit_model:
                    chunk.fail(i, f"prompt has {n} tokens, over the limit of {limit_model - 1} (the model's "
                                  f"context of {limit_model} less one new token)")
                    continue
                # Generation stops at the context's end ("length"), and the engines size a row's KV
                # cache by its max_new_tokens: a row asking for a million must not get it.
                request.max_new_tokens = min(request.max_new_tokens, limit_model - n)
            chunk.requests[i] = request
        chunk.order = list(chunk.requests)
        progress.skipped(chunk.n - len(chunk.order))
        return chunk

    def _finish_chunk(self, chunk: "_Chunk", progress: Progress, metadata: dict) -> pa.Table:
        """Everything after generation: output checks, redaction, the part's table."""
        generated = []
        for i in chunk.order:
            done = chunk.completions[i]
            if done.finish_reason == "error":
                chunk.fail(i, done.error)
                continue
            chunk.output[i], chunk.finish[i], chunk.output_tokens[i] = done.text, done.finish_reason, done.output_tokens
            generated.append(i)

        if self.checkers and generated:
            judgements = judge(self.checkers, [chunk.output[i] for i in generated], "output",
                               context=[chunk.prompt_texts[i] for i in generated])
            for i, judgement in zip(generated, judgements):
                chunk.output_safety[i] = [v.to_dict() for v in judgement.verdicts]
                chunk.output_safe[i] = judgement.safe
                if judgement.error:
                    chunk.output[i] = None
                    chunk.fail(i, judgement.error)
                elif judgement.safe is False:
                    chunk.finish[i] = "unsafe_output"
                    progress.unsafe_output += 1
                    if self.on_unsafe_output == "redact":
                        chunk.output[i] = None
        progress.errors += chunk.finish.count("error")

        table = chunk.table
        # Types from the dataset's unified schema (every chunk is read in it), so all parts match.
        keep = [pa.field(c, table.schema.field(c).type) for c in self.keep_columns]
        schema = output_schema(table.schema.field(self.id_column).type, keep, metadata)
        columns = {
            "id": table.column(self.id_column),
            "output": chunk.output, "finish_reason": chunk.finish,
            "prompt_safe": chunk.prompt_safe, "output_safe": chunk.output_safe,
            "prompt_safety": chunk.prompt_safety, "output_safety": chunk.output_safety,
            "error": chunk.error, "prompt_tokens": chunk.prompt_tokens, "output_tokens": chunk.output_tokens,
            **{c: table.column(c) for c in self.keep_columns},
        }
        return pa.table([pa.array(columns[f.name], f.type) if isinstance(columns[f.name], list)
                         else columns[f.name].cast(f.type) for f in schema], schema=schema)

    def _max_new_tokens(self, row: dict) -> int:
        """The row's own ``max_new_tokens`` (null or NaN: the job's)."""
        value = row.get(self.max_new_tokens_column)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return self.params.max_new_tokens
        try:
            number = int(value)
            whole = number == value if isinstance(value, (int, float)) else str(number) == str(value).strip()
        except (TypeError, ValueError, OverflowError):
            whole = False
        if not whole or number < 1:
            raise RowError(f"{self.max_new_tokens_column} is {value!r}, not a whole number of at least 1")
        return number

    @staticmethod
    def _reset_peak(loaded) -> None:
        import torch

        if loaded.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(loaded.device)

    @staticmethod
    def _peak(loaded) -> int | None:
        import torch

        return int(torch.cuda.max_memory_allocated(loaded.device)) if loaded.device.type == "cuda" else None


@dataclass
class TextJob(Job):
    """Generate text for every row of a Parquet input of prompts (or chat messages) with a causal LM:
    the fast engine on a GPU where the model allows, else padded batches of ``generate()``. The
    parameters are :class:`Job`'s.
    """

    kind: ClassVar[str] = "text"

    def _load(self):
        return get_model(self.model, self.hub)

    def _generator(self, loaded, progress: Progress):
        return self._fast_or(loaded, progress, FastEngine, lambda: BatchedGenerator(
            loaded, self.params, max_batch_size=self.batch_size, token_budget=self.token_budget,
            should_stop=self.stop_event.is_set, on_batch=progress.batch))

    def _build_request(self, row: dict, prepared, loaded) -> Request:
        return Request(encode(loaded.tokenizer, prepared), self._max_new_tokens(row))
