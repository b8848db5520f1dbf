"""How a job parameter is declared (:func:`option`, a dataclass field of :mod:`airflow_hfllm.config`) and what
the interfaces read of it (:class:`Option`): the operators' arguments, the CLI's flags, the checks of every
value, and what an output folder's fingerprint records (:func:`identity`, :func:`added`).

Plain values with no heavy imports: DAG parsing builds the operators' signatures from here.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Sequence

KINDS = ("text", "vision")


def option(default: Any = dataclasses.MISSING, help: str = "", *, cli: str | None = None,
           operator: str | None = None, templated: bool = False, kinds: tuple = KINDS,
           choices: tuple | None = None, minimum: float | None = None, maximum: float | None = None,
           metavar: str | None = None, per_kind: dict | None = None, since: int = 1) -> Any:
    """A dataclass field with what the interfaces need to know about it.

    :param cli: the CLI flag (default ``--name-with-dashes``); ``""`` keeps it off the CLI.
    :param operator: the operator's argument (default the name); ``""`` keeps it off the operators.
    :param templated: an Airflow template field.
    :param kinds: the job kinds that take it.
    :param choices, minimum, maximum: checked here, for every interface.
    :param per_kind: the default where a job kind differs ({"vision": 256}).
    :param since: the fingerprint format that added it: a later one is described only when set, so a
        folder written before it existed resumes (see :func:`identity`).
    """
    meta = dict(help=help, cli=cli, operator=operator, templated=templated, kinds=kinds, choices=choices,
                minimum=minimum, maximum=maximum, metavar=metavar, per_kind=per_kind or {}, since=since)
    return field(default=default, metadata={"option": meta})


@dataclass(frozen=True)
class Option:
    """One field as the interfaces see it."""

    name: str
    type: type
    many: bool  # a sequence: repeatable on the CLI
    optional: bool  # None allowed
    default: Any
    help: str
    cli: str
    operator: str
    templated: bool
    kinds: tuple
    choices: tuple | None
    minimum: float | None
    maximum: float | None
    metavar: str | None
    per_kind: dict  # kind -> its default, where it differs

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` ("must be >= 1, got 0"): not one of the choices, or out of bounds."""
        if value is None:
            return None
        if self.choices is not None and value not in self.choices:
            return f"must be one of {', '.join(map(repr, self.choices))}, got {value!r}"
        if self.minimum is not None and value < self.minimum:
            return f"must be >= {self.minimum:g}, got {value}"
        if self.maximum is not None and value > self.maximum:
            return f"must be <= {self.maximum:g}, got {value}"
        return None

    def default_for(self, kind: str | None) -> Any:
        return self.per_kind.get(kind, self.default)

    def coerce(self, value: Any) -> Any:
        """A value as an Airflow template renders it (a string) in the field's type."""
        if value is None or not isinstance(value, str):
            return tuple(value) if self.many and value is not None else value
        if self.many:
            return (value,)
        if value == "" and self.optional:
            return None
        if self.type is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"{self.operator or self.name} must be true or false, got {value!r}")
            return value.lower() in ("true", "1", "yes")
        if self.type in (int, float):
            try:
                return self.type(value)
            except ValueError:
                raise ValueError(f"{self.operator or self.name} must be a number, got {value!r}") from None
        return value


@functools.cache
def options(cls, kind: str | None = None) -> tuple[Option, ...]:
    """The fields of a config class that ``kind`` takes (all of them when ``None``); read once per class,
    since every config checks its values with them."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("option")
        if meta is None or (kind is not None and kind not in meta["kinds"]):
            continue
        base, optional, many = _unwrap(hints[f.name])
        found.append(Option(
            name=f.name, type=base, many=many, optional=optional, default=f.default,
            help=meta["help"], cli="--" + f.name.replace("_", "-") if meta["cli"] is None else meta["cli"],
            operator=f.name if meta["operator"] is None else meta["operator"], templated=meta["templated"],
            kinds=meta["kinds"], choices=meta["choices"], minimum=meta["minimum"], maximum=meta["maximum"],
            metavar=meta["metavar"], per_kind=meta["per_kind"]))
    return tuple(found)


def _unwrap(hint) -> tuple[type, bool, bool]:
    """(base type, None allowed, a sequence) of ``int | None``, ``tuple[str, ...]``, ``Sequence[Any]``."""
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = len(args) < len(typing.get_args(hint)), args[0]
    origin = typing.get_origin(hint)
    if origin in (tuple, list, Sequence, typing.Sequence) or hint in (tuple, list):
        return (typing.get_args(hint) or (Any,))[0], optional, True
    return hint, optional, False


def check(obj) -> None:
    """The checks every field declares: choices and bounds."""
    for opt in options(type(obj)):
        if problem := opt.problem(getattr(obj, opt.name)):
            raise ValueError(f"{opt.name} {problem}")


def identity(obj) -> dict:
    """What a config contributes to an output folder's fingerprint: every field, except those added
    after the first format while they are at their default (so that adding one rebuilds nothing)."""
    return _described(obj, later_only=False)


def added(obj) -> dict:
    """The fields of ``obj`` added after the first fingerprint format that are set (not at their default)."""
    return _described(obj, later_only=True)


def _described(obj, later_only: bool) -> dict:
    described = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        later = f.metadata.get("option", {}).get("since", 1) > 1
        if (later and value == f.default) or (later_only and not later):
            continue
        described[f.name] = list(value) if isinstance(value, tuple) else value
    return described
