"""What a kind of job is, as an object the job is given: how it loads its model, what it adds to a
row's prompt, how a row becomes a generation request, and its engines. :class:`TextKind` is here;
:class:`~airflow_hfllm.vision.job.VisionKind` is in the vision package, which a text job never imports.
"""

from __future__ import annotations

from typing import Any, Protocol

from airflow_hfllm.config import GenerationParams, JobConfig, ModelSpec
from airflow_hfllm.engine.generate import Request
from airflow_hfllm.engine.prompts import RowError
from airflow_hfllm.io.dataset import Dataset


class Kind(Protocol):
    name: str
    vision: bool  # the fast engine's support check differs

    def spec(self, model: ModelSpec) -> ModelSpec:
        """The model as this kind loads it."""

    def columns(self) -> list[str]:
        """Input columns this kind reads besides the prompt's."""

    def check_input(self, dataset: Dataset) -> None:
        """Raise :class:`~airflow_hfllm.io.dataset.InputError` when the input cannot run at all."""

    def load(self, model: ModelSpec, hub, log):
        """The loaded model (through the shared model cache)."""

    def prepare(self, values: dict) -> Any:
        """What the row adds to its prompt; raise :class:`RowError` for a bad row."""

    def requests(self, rows: list[tuple[list, Any, int]], loaded) -> list[Request | RowError]:
        """Each row's generation request, from its (messages, extra, max_new_tokens), or the
        :class:`RowError` that ends it."""

    def engines(self, loaded, params: GenerationParams, config: JobConfig, **common) -> tuple[Any, Any]:
        """(the fast engine's class and its extra arguments, a function building the batched generator)."""

    def fingerprint(self) -> dict:
        """What else changes this kind's outputs (the fingerprint's ``[kind]`` entry when not empty)."""

    def manifest(self) -> dict:
        """Keys this kind adds to the manifest."""


class TextKind:
    """Rows of prompts or chat messages, generated with a causal LM."""

    name = "text"
    vision = False

    def __init__(self, template_kwargs: dict | None = None):
        self.template_kwargs = template_kwargs

    def spec(self, model: ModelSpec) -> ModelSpec:
        return model

    def columns(self) -> list[str]:
        return []

    def check_input(self, dataset: Dataset) -> None:
        pass

    def load(self, model: ModelSpec, hub, log):
        from airflow_hfllm.engine.loading import get_model

        return get_model(model, hub)

    def prepare(self, values: dict) -> None:
        return None

    def requests(self, rows: list[tuple[list, None, int]], loaded) -> list[Request | RowError]:
        from airflow_hfllm.engine.prompts import encode_many

        encoded = encode_many(loaded.tokenizer, [messages for messages, _, _ in rows], self.template_kwargs)
        return [ids if isinstance(ids, RowError) else Request(ids, new) for ids, (_, _, new) in zip(encoded, rows)]

    def engines(self, loaded, params: GenerationParams, config: JobConfig, **common):
        from airflow_hfllm.engine.fast import FastEngine
        from airflow_hfllm.engine.generate import BatchedGenerator

        return (FastEngine, {}), lambda: BatchedGenerator(loaded, params, max_batch_size=config.batch_size,
                                                         token_budget=config.token_budget, **common)

    def fingerprint(self) -> dict:
        return {}

    def manifest(self) -> dict:
        return {}
