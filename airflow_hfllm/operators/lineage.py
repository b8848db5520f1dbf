"""OpenLineage datasets and facets of a generation task.

Imported only by the operators' ``get_openlineage_facets_on_*`` methods, which only the OpenLineage
provider calls: without the provider this module is never imported, and DAG parsing never pays for it.

What goes in: dataset identities (input, model, adapter, safety models, output), the model spec,
output column names and types, counts, tokens, timings and generation settings. What never goes in:
prompt or output text (nor the system prompt, prompt template or stop strings, which can quote
prompts), and no credentials: nothing here reads a connection.
"""

from __future__ import annotations

import os
from typing import Any

import attr
from airflow.providers.common.compat.openlineage.facet import (
    DatasetFacet,
    InputDataset,
    OutputDataset,
    OutputStatisticsOutputDatasetFacet,
    RunFacet,
    SchemaDatasetFacet,
    SchemaDatasetFacetFields,
)
from airflow.providers.openlineage.extractors import OperatorLineage

from airflow_hfllm.run.manifest import Manifest

try:  # newer openlineage-python only; the compat module does not re-export it
    from openlineage.client.generated.input_statistics_input_dataset import InputStatisticsInputDatasetFacet
except ImportError:  # pragma: no cover - old client
    InputStatisticsInputDatasetFacet = None

HUB_NAMESPACE = "huggingface"
# No public schema document exists for these custom facets (README "OpenLineage" describes them): a URN
# names them without pointing at a page that isn't there.
SCHEMA_BASE = "urn:airflow-hfllm:openlineage:facet"
GLOB_CHARS = set("*?[")
# Generation settings safe to publish: numbers and flags only (stop strings may quote prompts).
GENERATION_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty",
                   "min_length", "length_penalty", "seed")


@attr.define
class ModelDatasetFacet(DatasetFacet):
    """``hfllm_model``: how a model dataset was used (what was loaded, not the weights' lineage)."""

    role: str  # generator, adapter or safety
    revision: str | None = None
    dtype: str | None = None
    quantization: str | None = None
    adapter: str | None = None
    task: str | None = None
    checker: str | None = None  # safety checker kind (salesforce, llama-guard, classifier, blocklist)

    @staticmethod
    def _get_schema() -> str:
        return f"{SCHEMA_BASE}:hfllm_model"


@attr.define
class GenerationRunFacet(RunFacet):
    """``hfllm_generation``: what the run did, from its manifest (no row data)."""

    counts: dict
    tokens: dict
    parts: int
    seconds: float | None = None
    generate_seconds: float | None = None
    load_seconds: float | None = None
    output_tokens_per_second: float | None = None
    engine: str | None = None
    device: str | None = None
    fingerprint: str | None = None
    generation: dict = attr.Factory(dict)
    safety_checkers: list = attr.Factory(list)
    shard: int | None = None

    @staticmethod
    def _get_schema() -> str:
        return f"{SCHEMA_BASE}:hfllm_generation"


def dataset_id(location: Any) -> tuple[str, str]:
    """OpenLineage (namespace, name) of a path or URI, after the naming spec: local files are
    ``file`` + absolute path, object stores ``scheme://bucket`` + key. A glob names its folder (the
    dataset is the folder, whichever files matched); a connection id in the URI is left out."""
    text = str(location)
    if "://" in text:
        from airflow.sdk import ObjectStoragePath

        path = location if isinstance(location, ObjectStoragePath) else ObjectStoragePath(text)
        if path.protocol in ("file", "local"):
            namespace, name = "file", "/" + path.key.lstrip("/")
        else:
            namespace = f"{path.protocol}://{path.bucket}" if path.bucket else path.protocol
            name = path.key
    else:
        namespace, name = "file", os.path.abspath(os.path.expanduser(text))
    parts = name.split("/")
    for i, part in enumerate(parts):
        if GLOB_CHARS & set(part):
            parts = parts[:i]
            break
    name = "/".join(parts).rstrip("/") or "/"
    return namespace, name


def model_id(model: str) -> tuple[str, str]:
    """A hub id is ``huggingface`` + the id; a local folder or URI is named as any other path."""
    if "://" in model or os.path.isabs(model) or model.startswith((".", "~")) or os.path.isdir(model):
        return dataset_id(model)
    return HUB_NAMESPACE, model


def model_datasets(spec: dict, safety: list[dict]) -> list[InputDataset]:
    """The generator model, its adapter and every safety checker's model as input datasets."""
    datasets = [InputDataset(*model_id(spec["model"]), facets={"hfllm_model": ModelDatasetFacet(
        role="generator", revision=spec.get("revision"), dtype=spec.get("dtype"),
        quantization=spec.get("quantization"), adapter=spec.get("adapter"), task=spec.get("task"))})]
    if spec.get("adapter"):
        datasets.append(InputDataset(*model_id(spec["adapter"]), facets={"hfllm_model": ModelDatasetFacet(
            role="adapter", revision=spec.get("revision"))}))
    for checker in safety:  # the checkers' fingerprints; a blocklist has no model (its terms stay out)
        if checker.get("model"):
            datasets.append(InputDataset(*model_id(checker["model"]), facets={"hfllm_model": ModelDatasetFacet(
                role="safety", checker=str(checker["checker"]).split(":")[0], revision=checker.get("revision"))}))
    return datasets


def output_fields(fs, folder: str, part: str) -> list[SchemaDatasetFacetFields]:
    """Column names and types of one written part (its footer only)."""
    import pyarrow.parquet as pq

    if fs is None:
        schema = pq.read_schema(os.path.join(folder, part))
    else:
        with fs.open(f"{folder.rstrip('/')}/{part}", "rb") as f:
            schema = pq.read_schema(f)
    return [SchemaDatasetFacetFields(name=field.name, type=str(field.type)) for field in schema]


def run_facet(manifest: Manifest) -> GenerationRunFacet:
    """A generate task's manifest, or the merged manifest of a sharded run, as a run facet."""
    return GenerationRunFacet(
        counts={k: manifest.counts[k] for k in ("rows", "generated", "unsafe_prompt", "unsafe_output", "errors")},
        tokens=dict(manifest.tokens),
        parts=len(manifest.parts),
        seconds=manifest.seconds,
        generate_seconds=manifest.generate_seconds,
        load_seconds=manifest.load_seconds,
        output_tokens_per_second=manifest.output_tokens_per_second,
        engine=manifest.engine,
        device=manifest.device,
        fingerprint=manifest.fingerprint,
        generation={k: manifest.generation.get(k) for k in GENERATION_KEYS},
        safety_checkers=[str(c.get("checker")).split(":")[0] for c in manifest.safety],
        shard=manifest.shard["index"] if manifest.shard else None,
    )


def generate_lineage(input_path: Any, output_path: Any, spec: dict, manifest: Manifest | None = None,
                     output_files: tuple = (None, ""), log=None) -> OperatorLineage:
    """Lineage of one generate task. Without a manifest (start, or a failed run) only the datasets;
    with it, also the output's schema (read from ``output_files``, the fsspec filesystem and folder)
    and statistics and the run's counts."""
    inputs = [InputDataset(*dataset_id(input_path))]
    inputs += model_datasets(manifest.model if manifest else spec, manifest.safety if manifest else [])
    output = OutputDataset(*dataset_id(output_path))
    if manifest is None:
        return OperatorLineage(inputs=inputs, outputs=[output])

    if InputStatisticsInputDatasetFacet is not None:
        inputs[0].inputFacets["inputStatistics"] = InputStatisticsInputDatasetFacet(
            rowCount=manifest.rows, fileCount=None if manifest.shard else manifest.input["files"])
    output.outputFacets["outputStatistics"] = OutputStatisticsOutputDatasetFacet(
        rowCount=manifest.rows, fileCount=len(manifest.parts))
    if manifest.parts:
        try:
            output.facets["schema"] = SchemaDatasetFacet(fields=output_fields(*output_files, manifest.parts[0]))
        except Exception as exc:  # lineage must never fail the task: the datasets still go out
            if log:
                log.warning("OpenLineage: could not read the output schema: %s", type(exc).__name__)
    return OperatorLineage(inputs=inputs, outputs=[output], run_facets={"hfllm_generation": run_facet(manifest)})


def shard_plan_lineage(input_path: Any) -> OperatorLineage:
    return OperatorLineage(inputs=[InputDataset(*dataset_id(input_path))])


def merge_lineage(output_path: Any, manifest: Manifest | None) -> OperatorLineage:
    """The merged output: its statistics and counts over every shard."""
    output = OutputDataset(*dataset_id(output_path))
    run_facets = {}
    if manifest is not None:
        output.outputFacets["outputStatistics"] = OutputStatisticsOutputDatasetFacet(
            rowCount=manifest.rows, fileCount=len(manifest.parts))
        run_facets["hfllm_generation"] = run_facet(manifest)
    return OperatorLineage(outputs=[output], run_facets=run_facets)

