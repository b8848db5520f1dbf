"""Turning an input row into a prompt: template, system prompt, chat template, token ids."""

from __future__ import annotations

import datetime
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from airflow_hfllm.io.dataset import InputError

ROW = "row"


class RowError(ValueError):
    """Something wrong with one row; it goes to the row's ``error`` column."""


@dataclass(frozen=True)
class TemplateReads:
    """What a prompt template reads, found in its syntax tree before any row is rendered.

    :param columns: columns read by name (``row.text``, ``row['my col']``).
    :param dynamic_row: the row is also read in a way whose columns are known only per row
        (``row[name]``, ``row.get(...)``, ``{% for k in row %}``).
    :param variables: each other variable read, with the constant attribute/key paths read from it
        (an empty path: the variable as a whole).
    """

    columns: tuple[str, ...]
    dynamic_row: bool
    variables: dict[str, frozenset[tuple]]


def _reference(node) -> tuple[str, tuple] | None:
    """``(name, path)`` for a variable followed by constant lookups (``params.x['y']``: ``("params",
    (("attr", "x"), ("item", "y")))``); ``None`` for anything else."""
    from jinja2 import nodes

    path = []
    while isinstance(node, (nodes.Getattr, nodes.Getitem)):
        if isinstance(node, nodes.Getattr):
            path.append(("attr", node.attr))
        elif isinstance(node.arg, nodes.Const):
            path.append(("item", node.arg.value))
        else:
            return None
        node = node.node
    if isinstance(node, nodes.Name) and node.ctx == "load":
        return node.name, tuple(reversed(path))
    return None


def _references(node, found: list) -> None:
    from jinja2 import nodes

    ref = _reference(node) if isinstance(node, (nodes.Name, nodes.Getattr, nodes.Getitem)) else None
    if ref is not None:
        found.append(ref)
        return
    for child in node.iter_child_nodes():
        _references(child, found)


def template_reads(ast) -> TemplateReads:
    """What the parsed template ``ast`` reads; names it binds itself (``{% set %}``, loop variables)
    are not reads."""
    from jinja2 import meta

    free = meta.find_undeclared_variables(ast)
    found: list[tuple[str, tuple]] = []
    _references(ast, found)
    columns, dynamic, variables = [], False, {}
    for name, path in found:
        if name not in free:
            continue
        if name != ROW:
            variables.setdefault(name, set()).add(path)
            continue
        if not path:
            dynamic = True
            continue
        kind, key = path[0]
        # row is a dict: row.items, row.get, ... are its methods, not columns (row['items'] is one).
        if kind == "attr" and hasattr(dict, key):
            dynamic = True
        else:
            columns.append(str(key))
    return TemplateReads(tuple(dict.fromkeys(columns)), dynamic,
                         {name: frozenset(paths) for name, paths in variables.items()})


def describe_value(value) -> Any:
    """A JSON-able form of a template variable's value for the job fingerprint: what it renders as,
    except that functions, methods and modules (``macros.ds_add``) are named, since their repr
    holds a memory address that would change the fingerprint on every run."""
    from jinja2 import Undefined

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Undefined):
        return "<undefined>"
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): describe_value(value[k]) for k in value}
    if isinstance(value, (list, tuple)):
        return [describe_value(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(str(describe_value(v)) for v in value)
    if isinstance(value, types.ModuleType):
        return f"<module {value.__name__}>"
    if callable(value):
        qualname = getattr(value, "__qualname__", type(value).__qualname__)
        name = f"<callable {getattr(value, '__module__', None)}.{qualname}>"
        # A method of a plain value (logical_date.strftime, ds.replace) renders from that value. Other
        # objects' methods (ti.xcom_pull) are named only: their repr changes with every try.
        owner = getattr(value, "__self__", None)
        if isinstance(owner, (str, int, float, datetime.date, datetime.time, Mapping, list, tuple)):
            return [name, describe_value(owner)]
        return name
    return str(value)


def messages_type_error(typ) -> str | None:
    """Why an Arrow type cannot hold chat messages (a list of structs with string ``role`` and
    ``content``), or ``None`` when it can. A column of nulls only is left to the rows."""
    import pyarrow as pa

    if pa.types.is_null(typ):
        return None
    expected = "expected a list of structs with string fields role and content"
    if not (pa.types.is_list(typ) or pa.types.is_large_list(typ)):
        return f"is {typ}, {expected}"
    item = typ.value_type
    if not pa.types.is_struct(item):
        return f"is {typ}, {expected}"
    for name in ("role", "content"):
        index = item.get_field_index(name)
        if index < 0:
            return f"is {typ}, without a {name!r} field; {expected}"
        kind = item.field(index).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
            return f"is {typ}, whose {name!r} is {kind}; {expected}"
    return None


@dataclass
class PromptBuilder:
    """:param prompt_column: string column with the user prompt (or ``None`` with a template).
    :param messages_column: list of ``{role, content}`` structs, used instead of ``prompt_column``.
    :param system_prompt: applied to every row that has no system message of its own.
    :param prompt_template: Jinja rendered once per row, with the row as ``row`` (``"Summarise: {{ row.text
        }}"``) and the variables of ``template_context``.
    :param template_context: more variables the template may read, the same for every row (the
        operator passes the task's Airflow template context: ``{{ ds }}``, ``{{ params.x }}``, ...).
    """

    prompt_column: str | None = "prompt"
    messages_column: str | None = None
    system_prompt: str | None = None
    prompt_template: str | None = None
    template_context: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @cached_property
    def environment(self):
        import types

        from jinja2 import StrictUndefined
        from jinja2.sandbox import SandboxedEnvironment

        class NoModules(SandboxedEnvironment):
            # Jinja's sandbox blocks only private attributes; a module reached through a context value
            # (Airflow's ``macros.uuid`` holds ``os``) would hand a template the whole interpreter.
            def is_safe_attribute(self, obj, attr, value):
                return not isinstance(value, types.ModuleType) and super().is_safe_attribute(obj, attr, value)

        return NoModules(undefined=StrictUndefined)

    @cached_property
    def _parsed(self):
        from jinja2 import TemplateSyntaxError

        try:
            return self.environment.parse(self.prompt_template)
        except TemplateSyntaxError as exc:
            raise InputError(f"prompt_template is not valid Jinja: {exc} (line {exc.lineno})") from None

    @cached_property
    def template(self):
        if not self.prompt_template:
            return None
        return self.environment.from_string(self._parsed)

    @cached_property
    def reads(self) -> TemplateReads | None:
        """What the template reads (``None`` without a template)."""
        return template_reads(self._parsed) if self.prompt_template else None

    @cached_property
    def _variables(self) -> dict[str, Any]:
        # Only the variables the template reads go into each row's render: the context may be large.
        return {name: self.template_context[name] for name in self.reads.variables if name in self.template_context}

    def input_columns(self) -> list[str]:
        """Columns the input must have as prompts (a template's columns: see :meth:`check_input`)."""
        if self.messages_column:
            return [self.messages_column]
        if self.template is not None:
            return []
        return [self.prompt_column] if self.prompt_column else []

    def check_input(self, dataset) -> None:
        """Everything about prompts that can fail the whole job, checked before any model loads: the
        template's syntax, the variables and columns it reads, and the messages column's type.

        :raises InputError: naming the file and column at fault.
        """
        if self.messages_column:
            for file in dataset.files:
                problem = messages_type_error(file.schema.field(self.messages_column).type)
                if problem:
                    raise InputError(f"{file.path}: column {self.messages_column!r} {problem}")
            return
        if self.template is None:
            return
        reads = self.reads
        unknown = sorted(set(reads.variables) - set(self.template_context))
        if unknown:
            available = (f" and the template variables {', '.join(sorted(self.template_context))}"
                         if self.template_context else "")
            raise InputError(f"prompt_template reads {', '.join(unknown)}, not defined here: it can read the "
                             f"input row as row.<column>{available}")
        for file in dataset.files:
            missing = [c for c in reads.columns if c not in file.schema.names]
            if missing:
                raise InputError(f"{file.path}: prompt_template reads column {', '.join(map(repr, missing))}, "
                                 f"which the input does not have (columns: {', '.join(file.schema.names)})")
        if reads.dynamic_row:
            # Columns read by a computed name are known only by rendering: a missing one shows on the
            # first row as on every other, so the job fails here, not a row at a time to the end.
            from jinja2 import UndefinedError

            path, row = first_row(dataset)
            if row is not None:
                try:
                    self.template.render({**self._variables, ROW: row})
                except UndefinedError as exc:
                    raise InputError(f"{path}: prompt_template fails on the first row: {exc}") from None
                except Exception:  # anything else is that row's own problem, reported in its error column
                    pass

    def fingerprint(self) -> list:
        """What changes every row's prompt: system prompt, template, and the values of the template
        variables it reads (``{{ ds }}``: each logical date has its own prompts)."""
        described = [self.system_prompt, self.prompt_template]
        used = self.variables_read()
        return [*described, used] if used else described

    def variables_read(self) -> dict[str, Any]:
        """``{"ds": "2026-01-02", "params.topic": "rivers", ...}``: the values the template reads from
        its context, as :func:`describe_value` gives them."""
        if self.template is None or self.messages_column:
            return {}
        env, values = self.environment, {}
        for name, paths in sorted(self.reads.variables.items()):
            if name not in self.template_context:
                continue
            root = self.template_context[name]
            # The variable as a whole when the template reads it so, else each path it reads.
            for path in [()] if () in paths else sorted(paths, key=repr):
                value, label = root, name
                for kind, key in path:
                    label += f".{key}" if kind == "attr" else f"[{key!r}]"
                try:
                    for kind, key in path:
                        value = env.getattr(value, key) if kind == "attr" else env.getitem(value, key)
                    values[label] = describe_value(value)
                except Exception as exc:  # the render fails the same way, as that row's error
                    values[label] = f"<{type(exc).__name__}>"
        return values

    def messages(self, row: dict[str, Any]) -> list[dict[str, str]]:
        if self.messages_column:
            raw = row.get(self.messages_column)
            if raw is None or len(raw) == 0:
                raise RowError(f"{self.messages_column} is null or empty")
            messages = []
            for m in raw:
                if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not m.get("role"):
                    raise RowError(f"{self.messages_column} holds an entry without role and content")
                messages.append({"role": str(m["role"]), "content": m["content"]})
        else:
            if self.template is not None:
                try:
                    text = self.template.render({**self._variables, ROW: row})
                except Exception as exc:  # jinja errors: undefined column, bad filter, ...
                    raise RowError(f"prompt_template failed: {exc}") from None
            else:
                text = row.get(self.prompt_column)
                if text is None:
                    raise RowError(f"{self.prompt_column} is null")
                if not isinstance(text, str):
                    raise RowError(f"{self.prompt_column} is not a string")
            if not text.strip():
                raise RowError("prompt is empty")
            messages = [{"role": "user", "content": text}]
        if self.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages


def first_row(dataset) -> tuple[str | None, dict | None]:
    """The input's first row (read alone, not its file) and the file holding it."""
    import pyarrow.parquet as pq

    for file in dataset.files:
        if file.rows:
            with dataset.fs.open(file.path, "rb") as f:
                reader = pq.ParquetFile(f, pre_buffer=False)  # read on this thread: see Dataset._read
                batch = next(reader.iter_batches(batch_size=1, use_threads=False))
            return file.path, batch.slice(0, 1).to_pylist()[0]
    return None, None


def checked_text(messages: list[dict[str, str]]) -> str:
    """What the prompt safety check reads: everything but the operator's own system prompt."""
    return "\n".join(m["content"] for m in messages if m["role"] != "system")


def encode(tokenizer, messages: list[dict[str, str]], template_kwargs: dict | None = None) -> list[int]:
    """Token ids of the formatted prompt, ready for generation; ``template_kwargs`` go to the chat
    template (``enable_thinking``, ``reasoning_effort``)."""
    ids = encode_many(tokenizer, [messages], template_kwargs)[0]
    if isinstance(ids, RowError):
        raise ids
    return ids


def encode_many(tokenizer, conversations: list[list[dict[str, str]]], template_kwargs: dict | None = None
                ) -> list[list[int] | RowError]:
    """:func:`encode` for many rows: each row's ids, or the :class:`RowError` that ends it. The chat template
    renders row by row, then the tokenizer encodes them all in one call, in its own (Rust) threads: a
    chunk's prompts cost the job's loop a fraction of what one call per row did (apply_chat_template's
    tokenize=True is the same: the rendered text, no special tokens added)."""
    if not getattr(tokenizer, "chat_template", None):  # a base model: plain text, roles as simple prefixes
        texts = [m[0]["content"] if len(m) == 1 else
                 "\n\n".join(f"{x['role']}: {x['content']}" for x in m) + "\n\nassistant:" for m in conversations]
        return [list(ids) for ids in tokenizer(texts)["input_ids"]] if texts else []
    from jinja2 import TemplateError

    texts: list[str | RowError] = []
    for messages in conversations:
        try:
            texts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                       **(template_kwargs or {})))
        except TemplateError as exc:  # the template's own raise_exception(): roles out of order, ...
            texts.append(RowError(f"the model's chat template refused the messages: {exc}"))
    rendered = [t for t in texts if isinstance(t, str)]
    ids = iter(tokenizer(rendered, add_special_tokens=False)["input_ids"] if rendered else [])
    return [list(next(ids)) if isinstance(t, str) else t for t in texts]


def context_limit(model) -> int | None:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(cfg, "max_position_embeddings", None)
