"""A generation job: read chunk -> check prompts -> generate -> check outputs -> write part -> manifest.

Plain Python: the operators, the CLI and a notebook all build a :class:`TextJob` or a
:class:`~airflow_hfllm.vision.job.VisionJob` and call ``run()``. A retry skips the parts an earlier
attempt committed with the same fingerprint and redoes at most the chunks in flight
(:mod:`airflow_hfllm.run.state`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Iterator


from airflow_hfllm.config import GenerationParams, HubOptions, JobConfig, ModelSpec
from airflow_hfllm.options import added, identity, options
from airflow_hfllm.engine.generate import Cancelled
from airflow_hfllm.engine.prompts import PromptBuilder
from airflow_hfllm.io.dataset import Dataset, InputError, to_fs
from airflow_hfllm.io.parts import OutputDir, part_name
from airflow_hfllm.io.schema import OUTPUT_COLUMNS
from airflow_hfllm.run import engines
from airflow_hfllm.run.kinds import Kind, TextKind
from airflow_hfllm.run.manifest import Manifest, count, describe_parts
from airflow_hfllm.run.progress import Progress
from airflow_hfllm.run.rows import Chunk, Steps
from airflow_hfllm.run.state import FORMAT_VERSION, MANIFEST, Attempt, FolderState, Scope, Superseded, fingerprint, now
from airflow_hfllm.safety import SafetyChecker, make_checker

__all__ = ["Cancelled", "ErrorRateExceeded", "InputError", "Job", "Superseded", "TextJob"]

log = logging.getLogger("airflow_hfllm")


class ErrorRateExceeded(RuntimeError):
    """Everything was written, but too many rows ended in ``error``; ``manifest`` is the run's, as written."""

    def __init__(self, message: str, manifest: dict | None = None):
        super().__init__(message)
        self.manifest = manifest


class Job:
    """One job over one input and one output folder.

    :param kind: what the rows are (:class:`~airflow_hfllm.run.kinds.TextKind`, ``VisionKind``).
    :param input: Parquet file, folder or glob (local path or fsspec URL; with ``input_fs``, a path on
        that filesystem).
    :param output: output folder (likewise, with ``output_fs``).
    :param model: what to generate with; ``params``: how (``seed=None`` draws one, kept for retries).
    :param config: how rows are read, batched, checked and written (:class:`~airflow_hfllm.config.JobConfig`).
    :param template_context: more variables ``prompt_template`` reads (the operator's Airflow context:
        ``{{ ds }}``); the values it reads are part of the fingerprint.
    :param shard: one entry of :func:`~airflow_hfllm.run.shards.plan_shards`: generate its chunks only.
    :param run_info: the Airflow task instance, for the attempt records and the manifest.
    """

    def __init__(self, kind: Kind, input: str, output: str, model: ModelSpec, params: GenerationParams | None = None,
                 config: JobConfig | None = None, *, input_fs: Any = None, output_fs: Any = None,
                 hub: HubOptions | None = None, template_context: dict | None = None, shard: dict | None = None,
                 run_info: dict | None = None, logger: Any = None, stop_event: threading.Event | None = None):
        self.kind, self.input, self.output, self.input_fs, self.output_fs = kind, input, output, input_fs, output_fs
        self.model, self.params, self.config = kind.spec(model), params or GenerationParams(), config or JobConfig()
        self.hub, self.run_info, self.scope = hub, run_info or {}, Scope(shard)
        self.log = logger or log
        self.stop_event = stop_event or threading.Event()
        c = self.config
        for column in c.keep_columns:
            if column in OUTPUT_COLUMNS:
                raise ValueError(f"keep column {column!r} has the name of an output column "
                                 f"({', '.join(OUTPUT_COLUMNS)}): rename it in the input to keep it")
        self.prompts = PromptBuilder(c.prompt_column, c.messages_column, c.system_prompt, c.prompt_template,
                                     template_context or {})
        self.checkers: list[SafetyChecker] = [make_checker(spec, hub) for spec in c.safety_checkers]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(input={self.input!r}, output={self.output!r}, model={self.model.model!r})"

    def cancel(self) -> None:
        """Ask the job to stop between batches; ``run()`` then raises :class:`Cancelled`."""
        self.stop_event.set()

    def open_input(self) -> Dataset:
        c = self.config
        prompt_columns = self.prompts.input_columns()
        strings = [c.prompt_column] if c.prompt_column in prompt_columns else []
        # A shard's planner checked ids across the whole input; every shard re-reading them is waste.
        dataset = Dataset.open(self.input, self.input_fs, required=[c.id_column, *prompt_columns, *c.keep_columns,
                                                                    *self.kind.columns()],
                               string_columns=strings, id_column=c.id_column, check_ids=self.scope.shard is None)
        self.prompts.check_input(dataset)
        self.kind.check_input(dataset)
        return dataset

    def run(self) -> dict:
        t0 = time.monotonic()
        out_fs, out_path = to_fs(self.output, self.output_fs)
        if out_fs.isfile(out_path):
            raise InputError(f"output {out_path} is a file, not a folder")
        dataset = self.open_input()
        overlap = dataset.overlaps(out_fs, out_path)
        if overlap:  # a retry would read this run's parts as input
            raise InputError(f"{overlap}: put the output outside the input")
        out = OutputDir(out_fs, out_path)
        removed = out.remove_foreign(self.config.replace_foreign_files)
        if removed:
            self.log.info("output %s: removed %d files this job did not write (replace_foreign_files)",
                          out.uri, len(removed))
        folder = FolderState(out, self.scope, self.log)
        asked = self.scope.seed(self.params.seed)
        n_chunks = dataset.num_chunks(self.config.chunk_rows)
        done = folder.resume(self._fingerprint(dataset, asked if asked is not None else "auto"), asked, n_chunks)
        mine = self.scope.chunks(n_chunks)
        todo = set(mine) - set(done)
        self.log.info("input: %d files, %d rows, %d chunks of %d rows%s; %d chunks already done, %d to do",
                      len(dataset.files), dataset.rows, n_chunks, self.config.chunk_rows, self.scope.describe(mine),
                      len(done), len(todo))
        attempt = Attempt(out, self.scope, self.run_info)
        facts = dict(rows=0, output_tokens=0)
        timings = dict(engine=None, device="none", load_seconds=0.0, generate_seconds=0.0, compile_seconds=0.0,
                       engine_stats=None, peak_gpu_memory_bytes=None)
        if todo:
            out.remove(MANIFEST)  # it describes parts about to be rewritten
            timings.update(self._generate(dataset, todo, folder, attempt, done, facts))

        attempt.finish(seconds=round(time.monotonic() - t0, 3), **facts)
        folder.check_owner()
        done = folder.committed(mine, done)
        gen = timings["generate_seconds"]
        manifest = Manifest(
            output=out.uri, **describe_parts(done), fingerprint=folder.fp, seed=folder.seed,
            model=self.model.to_dict(), generation=self.params.replace(seed=folder.seed).to_dict(),
            safety=[c.describe() for c in self.checkers],
            input={"location": str(self.input), "files": len(dataset.files), "rows": dataset.rows},
            chunk_rows=self.config.chunk_rows, started=attempt.started, finished=now(), attempts=out.attempts(),
            seconds=round(time.monotonic() - t0, 3),
            output_tokens_per_second=round(facts["output_tokens"] / gen, 1) if gen else None,
            airflow=self.run_info or None, vision=self.kind.manifest() or None, **timings)
        if self.scope.shard is not None:  # a shard's summary: the merge step writes _manifest.json
            manifest.shard = {**self.scope.shard.to_dict(), "chunks": [mine.start, mine.stop]}
            manifest.attempts = [a for a in manifest.attempts if a.get("shard") == self.scope.shard.index]
        result = manifest.to_dict()
        out.write_json(self.scope.summary_name, result)
        totals = manifest.counts
        self.log.info("wrote %d parts, %d rows (%d generated, %d unsafe prompts, %d unsafe outputs, %d errors) to %s",
                      len(done), totals["rows"], totals["generated"], totals["unsafe_prompt"],
                      totals["unsafe_output"], totals["errors"], out.uri)
        if totals["rows"] and totals["errors"] / totals["rows"] > self.config.max_error_rate:
            raise ErrorRateExceeded(
                f"{totals['errors']} of {totals['rows']} rows ended in error, over max_error_rate="
                f"{self.config.max_error_rate}; see the 'error' column in {out.uri}", result)
        return result

    def _generate(self, dataset: Dataset, todo: set[int], folder: FolderState, attempt: Attempt,
                  done: dict[int, dict], facts: dict) -> dict:
        """Load, then the loop: schedule chunks, generate, write each part as its chunk is done."""
        t_load = time.monotonic()
        loaded = self.kind.load(self.model, self.hub, self.log)
        todo_rows = sum(dataset.chunk_sizes(self.config.chunk_rows)[k] for k in todo)
        for checker in self.checkers:
            checker.expect(2 * todo_rows)  # a prompt check and an output check per row, at most
            checker.load()
        load_seconds = time.monotonic() - t_load
        _reset_peak(loaded)
        progress = Progress(self.log, dataset.rows * self.params.num_return_sequences,
                            sum(r["counts"]["rows"] for r in done.values()),
                            self.config.progress_every)
        driver = engines.choose(self.kind, loaded, self.params, self.config, should_stop=self.stop_event.is_set,
                                on_batch=progress.batch, log=self.log, model_name=self.model.model,
                                output_tokens=todo_rows * self.params.num_return_sequences * self.params.max_new_tokens)
        steps = Steps(self.kind, self.prompts, self.config, self.params, self.checkers, progress)
        t_gen = time.monotonic()
        for chunk, completions in driver.run(self._chunks(dataset, todo, steps, loaded), seed=folder.seed):
            part = steps.finish(chunk, completions, self._part_metadata(folder, chunk.index))
            counts = count(part.column("finish_reason").to_pylist(), part.column("prompt_tokens").to_pylist(),
                           part.column("output_tokens").to_pylist())
            done[chunk.index] = folder.commit(chunk.index, part, {"part": part_name(chunk.index), "counts": counts,
                                                                  "written": now()})
            attempt.wrote(chunk.index)
            facts["rows"] += counts["rows"]
            facts["output_tokens"] += counts["output_tokens"]
            progress.maybe_log()
        generate_seconds = time.monotonic() - t_gen
        progress.maybe_log(force=True)
        return dict(engine=driver.name, device=str(loaded.device), load_seconds=round(load_seconds, 3),
                    generate_seconds=round(generate_seconds, 3), compile_seconds=round(driver.compile_seconds, 3),
                    engine_stats=driver.stats(), peak_gpu_memory_bytes=_peak(loaded))

    def _chunks(self, dataset: Dataset, todo: set[int], steps: Steps, loaded) -> Iterator[Chunk]:
        for index, table in dataset.chunks(self.config.chunk_rows, self._columns(dataset), wanted=todo):
            if self.stop_event.is_set():
                raise Cancelled("stopped between chunks")
            yield steps.start(index, table, loaded)

    def _columns(self, dataset: Dataset) -> list[str]:
        """The input columns a chunk is read with."""
        c = self.config
        if c.prompt_template:  # the template may read any column
            columns = list(dataset.schema.names)
        else:
            columns = self.prompts.input_columns()
            if c.max_new_tokens_column in dataset.schema.names:
                columns.append(c.max_new_tokens_column)
        return list(dict.fromkeys([c.id_column, *columns, *self.kind.columns(), *c.keep_columns]))

    def _fingerprint(self, dataset: Dataset, seed) -> str:
        c = self.config
        described = {
            "format": FORMAT_VERSION,
            "input": dataset.fingerprint(content=c.input_fingerprint == "content"),
            "model": identity(self.model),
            "params": identity(self.params.replace(seed=seed)),
            "safety": [checker.fingerprint() for checker in self.checkers],
            "on_unsafe_output": c.on_unsafe_output,
            "columns": [c.id_column, c.prompt_column, c.messages_column, c.max_new_tokens_column,
                        list(c.keep_columns)],
            "prompt": self.prompts.fingerprint(),
            "chunk_rows": c.chunk_rows,
            "max_prompt_tokens": c.max_prompt_tokens,
            **added(c),  # options added since: described only when set, so older folders keep resuming
        }
        extra = self.kind.fingerprint()
        if extra:  # a text job's fingerprint stays what it always was
            described[self.kind.name] = extra
        return fingerprint(described)

    def _part_metadata(self, folder: FolderState, index: int) -> dict:
        return {"fingerprint": folder.fp, "part": index, "model": self.model.to_dict(),
                "generation": self.params.replace(seed=folder.seed).to_dict(), "format": FORMAT_VERSION}


def split_arguments(kind: str, arguments: dict, *extra_configs) -> tuple[dict, ...]:
    """Flat keyword arguments (``chunk_rows=...``, as a notebook writes them) as (the
    :class:`JobConfig`, each of ``extra_configs``, the rest); the kind's defaults where not given."""
    built = []
    for cls in (JobConfig, *extra_configs):
        values = {}
        for opt in options(cls):
            if opt.name in arguments:
                if kind not in opt.kinds:
                    raise ValueError(f"a {kind} job does not take {opt.name}")
                values[opt.name] = arguments.pop(opt.name)
            elif kind in opt.kinds:
                values[opt.name] = opt.default_for(kind)
        built.append(cls(**values))
    return (*built, arguments)


def default_params(kind: str) -> GenerationParams:
    return GenerationParams(**{o.name: o.default_for(kind) for o in options(GenerationParams, kind)})


class TextJob(Job):
    """Generate text for every row of a Parquet input of prompts (or chat messages) with a causal LM:
    the fast engine on a GPU where the model allows, else padded batches of ``generate()``. Takes
    :class:`Job`'s arguments, with :class:`~airflow_hfllm.config.JobConfig`'s fields flat
    (``TextJob(input=..., output=..., model=ModelSpec(...), chunk_rows=500)``)."""

    def __init__(self, **arguments):
        config, rest = split_arguments("text", arguments)
        super().__init__(TextKind(config.chat_template_kwargs), config=config, **rest)


def _reset_peak(loaded) -> None:
    import torch

    if loaded.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(loaded.device)


def _peak(loaded) -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated(loaded.device)) if loaded.device.type == "cuda" else None
