"""The steps of one chunk, over one record per row: before generation (prompt, prompt check, token
limits: :meth:`Steps.start`) and after it (output check, redaction, the part's table:
:meth:`Steps.finish`). A bad row ends in ``error`` and the others go on."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from airflow_hfllm.engine.generate import Completion, Request
from airflow_hfllm.engine.prompts import PromptBuilder, RowError, checked_text, context_limit
from airflow_hfllm.io.schema import output_schema
from airflow_hfllm.run.progress import Progress
from airflow_hfllm.safety import judge

THINK = ("<think>", "</think>")


@dataclass
class Row:
    """One input row on its way to the output: its output columns, filled in as it goes."""

    key: Any  # what the row's samples are seeded from: its id, or (id, sample) for samples after the first
    values: dict
    index: int = 0  # its row in the chunk's table
    sample: int = 0
    messages: list | None = None
    extra: Any = None  # what the kind adds to the prompt (a vision row's images)
    prompt_text: str = ""  # what the checkers read
    request: Request | None = None
    output: str | None = None
    reasoning: str | None = None
    finish_reason: str | None = None
    error: str | None = None
    prompt_safe: bool | None = None
    output_safe: bool | None = None
    prompt_safety: list = field(default_factory=list)
    output_safety: list = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    output_logprob: float | None = None
    top_logprobs: list | None = None  # holds the output's tokens: nulled with it
    choice_logprobs: list | None = None

    def fail(self, message: str) -> None:
        self.error, self.finish_reason = message, "error"

    def drop_output(self) -> None:
        """Nulls the output and what holds or scores its text (an error, a redaction)."""
        self.output = self.reasoning = self.output_logprob = self.top_logprobs = self.choice_logprobs = None

    @property
    def live(self) -> bool:
        return self.finish_reason is None


@dataclass
class Chunk:
    """An input chunk: its table (the keep columns come from it) and its rows."""

    index: int
    table: pa.Table
    rows: list[Row]

    @property
    def todo(self) -> list[int]:
        """The positions of the rows that go to the generator."""
        return [i for i, row in enumerate(self.rows) if row.request is not None]


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


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(the model's ``<think>`` block, the answer after it). A template that opens the block in the prompt
    (DeepSeek-R1) leaves only ``</think>`` in the output; a reply cut inside the block is all reasoning."""
    end = text.find(THINK[1])
    if end < 0:
        body = text.lstrip()
        return (body[len(THINK[0]):].strip(), "") if body.startswith(THINK[0]) else (None, text)
    start = text.find(THINK[0])
    reasoning = text[start + len(THINK[0]) if 0 <= start < end else 0:end].strip()
    return reasoning, text[end + len(THINK[1]):].lstrip()


class Steps:
    """The chunk steps of one job: ``kind`` says what a row adds to its prompt and how it becomes a
    request."""

    def __init__(self, kind, prompts: PromptBuilder, config, params, checkers, progress: Progress):
        self.kind, self.prompts, self.config, self.params = kind, prompts, config, params
        self.checkers, self.progress = checkers, progress

    def start(self, index: int, table: pa.Table, loaded) -> Chunk:
        """Everything before generation: prompts, prompt checks, token limits."""
        values, bad = python_rows(table)
        keys = table.column(self.config.id_column).to_pylist()
        rows = [Row(key, row, i) for i, (key, row) in enumerate(zip(keys, values))]
        for i, row in enumerate(rows):
            try:
                if i in bad:
                    raise RowError(bad[i])
                row.messages = self.prompts.messages(row.values)
                row.extra = self.kind.prepare(row.values)
                row.prompt_text = checked_text(row.messages)
            except RowError as exc:
                row.fail(str(exc))
        self._check_prompts([row for row in rows if row.live])
        wanted = []
        for row in rows:
            if row.live:
                try:
                    wanted.append((row, self.max_new_tokens(row.values)))
                except RowError as exc:
                    row.fail(str(exc))
        made = self.kind.requests([(row.messages, row.extra, new) for row, new in wanted], loaded)
        limit = context_limit(loaded.model)
        for (row, _), request in zip(wanted, made):
            self._request(row, request, limit)
        chunk = Chunk(index, table, [sample for row in rows for sample in self._samples(row)])
        self.progress.skipped(len(chunk.rows) - len(chunk.todo))
        return chunk

    def _samples(self, row: Row) -> list[Row]:
        """The row once per sample; sample 0 keeps the row's id as its key, so it is what a single sample
        would have been."""
        copies = [row]
        for k in range(1, self.params.num_return_sequences):
            request = None if row.request is None else dataclasses.replace(row.request)
            copies.append(dataclasses.replace(row, key=("sample", row.key, k), sample=k, request=request,
                                              prompt_safety=list(row.prompt_safety)))
        return copies

    def _check_prompts(self, rows: list[Row]) -> None:
        if not self.checkers:
            return
        for row, judgement in zip(rows, judge(self.checkers, [row.prompt_text for row in rows], "prompt")):
            row.prompt_safety = [v.to_dict() for v in judgement.verdicts]
            row.prompt_safe = judgement.safe
            if judgement.error:
                row.fail(judgement.error)
            elif judgement.safe is False:
                row.finish_reason = "unsafe_prompt"
                self.progress.unsafe_prompt += 1

    def _request(self, row: Row, request: Request | RowError, limit: int | None) -> None:
        if isinstance(request, RowError):
            row.fail(str(request))
            return
        n = row.prompt_tokens = len(request.input_ids)
        most = self.config.max_prompt_tokens
        if most and n > most:
            row.fail(f"prompt has {n} tokens, over the limit of {most} (max_prompt_tokens)")
            return
        if limit:
            if n >= limit:
                row.fail(f"prompt has {n} tokens, over the limit of {limit - 1} (the model's context of {limit} "
                         "less one new token)")
                return
            # Generation stops at the context's end ("length"), and the engines size a row's KV cache
            # by its max_new_tokens: a row asking for a million must not get it.
            request.max_new_tokens = min(request.max_new_tokens, limit - n)
        row.request = request

    def max_new_tokens(self, values: dict) -> int:
        """The row's own ``max_new_tokens`` (null or NaN: the job's)."""
        column = self.config.max_new_tokens_column
        value = values.get(column)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return self.params.max_new_tokens
        try:
            number = int(value)
            whole = number == value if isinstance(value, (int, float)) else str(number) == str(value).strip()
        except (TypeError, ValueError, OverflowError):
            whole = False
        if not whole or number < 1:
            raise RowError(f"{column} is {value!r}, not a whole number of at least 1")
        return number

    def finish(self, chunk: Chunk, completions: dict[int, Completion], metadata: dict) -> pa.Table:
        """Everything after generation (``completions`` by row position): output checks, redaction, the
        part's table."""
        generated = []
        for i, done in completions.items():
            row = chunk.rows[i]
            if done.finish_reason == "error":
                row.fail(done.error)
                continue
            row.output, row.finish_reason, row.output_tokens = done.text, done.finish_reason, done.output_tokens
            row.output_logprob, row.top_logprobs = done.logprob, done.top_logprobs
            row.choice_logprobs = done.choice_logprobs
            if self.config.reasoning:
                row.reasoning, row.output = split_reasoning(row.output)
            generated.append(row)
        self._check_outputs(generated)
        for i, done in completions.items():  # a constrained output that did not complete: written, not valid
            row = chunk.rows[i]
            if done.error and row.finish_reason == done.finish_reason and not row.error:
                row.error = done.error
        self.progress.errors += sum(row.finish_reason == "error" for row in chunk.rows)
        return self._table(chunk, metadata)

    def _check_outputs(self, rows: list[Row]) -> None:
        if not (self.checkers and rows):
            return
        judgements = judge(self.checkers, [row.output for row in rows], "output",
                           context=[row.prompt_text for row in rows])
        for row, judgement in zip(rows, judgements):
            row.output_safety = [v.to_dict() for v in judgement.verdicts]
            row.output_safe, row.error = judgement.safe, judgement.error
        # The reasoning is checked as its own text, not as part of the answer.
        thought = [row for row in rows if row.reasoning and not row.error]
        for row, judgement in zip(thought, judge(self.checkers, [row.reasoning for row in thought], "output",
                                                 context=[row.prompt_text for row in thought])):
            row.output_safety += [{**v.to_dict(), "checker": f"{v.checker} (reasoning)"} for v in judgement.verdicts]
            row.output_safe = False if False in (row.output_safe, judgement.safe) else row.output_safe
            row.error = judgement.error
        for row in rows:
            if row.error:
                row.drop_output()
                row.fail(row.error)
            elif row.output_safe is False:
                row.finish_reason = "unsafe_output"
                self.progress.unsafe_output += 1
                if self.config.on_unsafe_output == "redact":
                    row.drop_output()

    def _table(self, chunk: Chunk, metadata: dict) -> pa.Table:
        table, keep_columns = chunk.table, self.config.keep_columns
        # Types from the dataset's unified schema (every chunk is read in it), so all parts match.
        keep = [pa.field(c, table.schema.field(c).type) for c in keep_columns]
        samples = self.params.num_return_sequences > 1
        schema = output_schema(table.schema.field(self.config.id_column).type, keep, metadata, self.config.reasoning,
                               samples, self.params.logprobs is not None, self.params.scores_choices)
        if samples:  # a table row per sample
            table = table.take([row.index for row in chunk.rows])
        columns = {"id": table.column(self.config.id_column), **{c: table.column(c) for c in keep_columns}}
        for f in schema:
            if f.name not in columns:
                columns[f.name] = pa.array([getattr(row, f.name) for row in chunk.rows], f.type)
        return pa.table([columns[f.name].cast(f.type) for f in schema], schema=schema)
