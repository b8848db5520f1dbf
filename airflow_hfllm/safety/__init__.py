"""Pluggable safety checkers: ``SafetyChecker`` and the built-in kinds."""

from __future__ import annotations

from typing import Any

from airflow_hfllm.safety.base import Judgement, SafetyChecker, Verdict, judge

KINDS = ("salesforce", "llama-guard", "classifier", "blocklist")

__all__ = ["KINDS", "Judgement", "SafetyChecker", "Verdict", "judge", "make_checker"]


def make_checker(spec: Any, hub=None) -> SafetyChecker:
    """A checker from an instance, ``"KIND:MODEL"`` (``salesforce``, ``llama-guard``, ``classifier``,
    ``blocklist`` with a file path), or a dict ``{"kind": ..., "model": ..., **options}`` (options: the
    checker class's keyword arguments, e.g. ``threshold``)."""
    if isinstance(spec, SafetyChecker):
        return spec
    if isinstance(spec, str):
        kind, sep, target = spec.partition(":")
        if not sep or not target:
            raise ValueError(f"safety checker {spec!r} must look like KIND:MODEL, KIND one of {KINDS}")
        spec = {"kind": kind, "model": target}
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(f"cannot make a safety checker from {spec!r}")
    options = dict(spec)
    kind = options.pop("kind")
    target = options.pop("model", None) or options.pop("path", None)
    if kind == "salesforce":
        from airflow_hfllm.safety.salesforce import DEFAULT_MODEL, SalesforceChecker

        return SalesforceChecker(target or DEFAULT_MODEL, hub=hub, **options)
    if kind == "llama-guard":
        from airflow_hfllm.safety.llama_guard import LlamaGuardChecker

        if not target:
            raise ValueError("llama-guard needs a model, e.g. llama-guard:meta-llama/Llama-Guard-3-1B")
        return LlamaGuardChecker(target, hub=hub, **options)
    if kind == "classifier":
        from airflow_hfllm.safety.classifier import ClassifierChecker

        return ClassifierChecker(target, hub=hub, **options)
    if kind == "blocklist":
        from airflow_hfllm.safety.blocklist import BlocklistChecker

        return BlocklistChecker(options.pop("terms", None) or target, **options)
    raise ValueError(f"unknown safety checker kind {kind!r}; use one of {KINDS}")
