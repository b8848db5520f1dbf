"""What the generate operators share: parameters (from :mod:`airflow_hfllm.config`), hub connection,
GPU claim, failure handling, assets."""

from __future__ import annotations

import dataclasses
import inspect
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from airflow_hfllm.config import CONFIGS, JobConfig, VisionOptions
from airflow_hfllm.options import Option, options
from airflow_hfllm.hooks.huggingface import HuggingFaceHook

if TYPE_CHECKING:
    from airflow.sdk import Context


def fs_and_path(location) -> tuple[Any, str]:
    """An ``ObjectStoragePath`` (or a URI string, ``s3://conn_id@bucket/key``) becomes its fsspec
    filesystem (with the connection's credentials) and path; a plain path stays local."""
    from airflow.sdk import ObjectStoragePath

    if isinstance(location, str) and "://" not in location:
        return None, location
    path = location if isinstance(location, ObjectStoragePath) else ObjectStoragePath(str(location))
    return path.fs, path.path


def config_options(kind: str) -> list[tuple[type, Option]]:
    """The job parameters an operator of ``kind`` takes, each with its config class."""
    return [(cls, opt) for cls in CONFIGS for opt in options(cls, kind) if opt.operator]


def operator_signature(kind: str, init) -> inspect.Signature:
    """``init``'s signature with every job parameter of ``kind`` as a keyword argument with its default,
    so that Airflow's ``default_args``, ``partial()`` and ``expand()`` know them."""
    own = list(inspect.signature(init).parameters.values())
    taken = {p.name for p in own}
    added = [inspect.Parameter(opt.operator, inspect.Parameter.KEYWORD_ONLY, annotation=opt.type,
                               default=inspect.Parameter.empty if opt.default is dataclasses.MISSING
                               else opt.default_for(kind))
             for _, opt in config_options(kind) if opt.operator not in taken]
    required = [p for p in added if p.default is inspect.Parameter.empty]
    optional = [p for p in added if p.default is not inspect.Parameter.empty]
    return inspect.Signature([*own[:-1], *required, *optional, own[-1]])


def operator_doc(kind: str) -> str:
    """The ``:param:`` lines of every job parameter of ``kind``, from their help."""
    lines = []
    for _, opt in config_options(kind):
        default = opt.default_for(kind)
        shown = "" if default is dataclasses.MISSING or default in (None, ()) else f" Default: ``{default!r}``."
        lines.append(f"    :param {opt.operator}: {opt.help}.{shown}{' Templated.' if opt.templated else ''}")
    return "\n".join(lines) + "\n"


class HFGenerateBaseOperator(BaseOperator):
    """
    Base of :class:`~airflow_hfllm.operators.text.HFTextGenerateOperator` and
    :class:`~airflow_hfllm.operators.vision.HFVisionGenerateOperator`, which set :attr:`kind`. Every
    job parameter (model, generation, rows, safety, ...) is a keyword argument, listed with its default
    in each operator's signature and docstring from :mod:`airflow_hfllm.config`. Besides those:

    :param input_path: Parquet file, folder or glob; local path, ``ObjectStoragePath`` or URI
        (``s3://conn_id@bucket/key``). Templated.
    :param output_path: output folder, same forms. Templated (e.g. ``.../ds={{ ds }}``).
    :param enable_salesforce_content_safety: check prompts and outputs with ``salesforce_safety_model``
        (the spec's switch). Templated.
    :param salesforce_safety_model: the seq2seq safety model for the switch above.
    :param hf_conn_id: ``huggingface`` connection: token, cache dir, offline flag.
    :param shard: one entry of :class:`~airflow_hfllm.operators.shards.HFShardPlanOperator`'s plan (use
        ``.expand_kwargs(plan.output)``): this task then generates its own chunks only and writes a
        shard summary; :class:`~airflow_hfllm.operators.shards.HFMergeShardsOperator` writes the manifest.
    :param output_asset: an ``Asset`` (or its URI) for the output root, added to ``outlets``: each run
        emits an asset event whose extra names the partition written (logical date or run id), the
        output folder and the counts, so downstream DAGs can be scheduled on it.

    ``prompt_template`` is rendered by the job once per row, with the row as ``row`` and this task's
    template context (``{{ ds }}``, ``{{ params.x }}``, the DAG's ``user_defined_macros``); a column it
    reads that the input lacks fails the task before any model loads. The UI's Rendered Templates tab
    shows it as written.
    """

    kind = ""
    _own_template_fields = ("input_path", "output_path", "enable_salesforce_content_safety")
    template_fields_renderers = {"prompt_template": "jinja", "system_prompt": "md"}

    def __init__(
        self,
        *,
        input_path: Any,
        output_path: Any,
        enable_salesforce_content_safety: bool = False,
        salesforce_safety_model: str = "Salesforce/safety-flan-t5-base",
        hf_conn_id: str | None = HuggingFaceHook.default_conn_name,
        shard: dict | None = None,
        output_asset: Any = None,
        **kwargs,
    ):
        given = {}
        for _, opt in config_options(self.kind):
            given[opt.operator] = kwargs.pop(opt.operator, opt.default_for(self.kind))
            if given[opt.operator] is dataclasses.MISSING:
                raise TypeError(f"missing keyword argument {opt.operator!r}")
        if output_asset is not None:
            from airflow.sdk import Asset

            if not isinstance(output_asset, Asset):
                output_asset = Asset(uri=str(output_asset), name=str(output_asset))
            kwargs["outlets"] = [*kwargs.get("outlets", []), output_asset]
        super().__init__(**kwargs)
        for name, value in given.items():
            setattr(self, name, value)
        self.input_path = input_path
        self.output_path = output_path
        self.enable_salesforce_content_safety = enable_salesforce_content_safety
        self.salesforce_safety_model = salesforce_safety_model
        self.hf_conn_id = hf_conn_id
        self.shard = shard
        self.output_asset = output_asset
        self._job = None
        self._manifest = None  # kept for the OpenLineage facets of the finished run

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # Only on the class that names the kind: a user's subclass keeps its own template_fields and doc.
        if "kind" in cls.__dict__:
            cls.template_fields = (*cls._own_template_fields,
                                   *(opt.operator for _, opt in config_options(cls.kind) if opt.templated))
            cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n\n    Job parameters:\n\n" + operator_doc(cls.kind)

    def _do_render_template_fields(self, parent, template_fields, context, jinja_env, seen_oids) -> None:
        # Rendered here, {{ row.text }} would be undefined: the job renders prompt_template per row,
        # with this same context (job_arguments). It stays a template field for the UI. (Mapped tasks
        # render through this method too, not through render_template_fields.)
        if parent is self:
            template_fields = [name for name in template_fields if name != "prompt_template"]
        super()._do_render_template_fields(parent, template_fields, context, jinja_env, seen_oids)

    @cached_property
    def hook(self) -> HuggingFaceHook:
        return HuggingFaceHook(hf_conn_id=self.hf_conn_id)

    def build_job(self, context: Context):
        """The job this task runs: its parameters as set on this task, with templates rendered."""
        from airflow_hfllm.config import GenerationParams, ModelSpec

        values = {cls: {} for cls in CONFIGS}
        for cls, opt in config_options(self.kind):
            values[cls][opt.name] = opt.coerce(getattr(self, opt.operator))
        flat = {**values[JobConfig], **values[VisionOptions]}
        if self.enable_salesforce_content_safety in (True, "True", "true"):
            flat["safety_checkers"] = (f"salesforce:{self.salesforce_safety_model}", *flat["safety_checkers"])
        input_fs, input_path = fs_and_path(self.input_path)
        output_fs, output_path = fs_and_path(self.output_path)
        arguments = dict(
            input=input_path, input_fs=input_fs, output=output_path, output_fs=output_fs,
            model=ModelSpec(**values[ModelSpec]), params=GenerationParams(**values[GenerationParams]),
            template_context=self._template_context(context) if flat["prompt_template"] else {},
            hub=self.hook.get_conn(), run_info=self._run_info(context), logger=self.log, shard=self.shard, **flat)
        if self.kind == "vision":
            from airflow_hfllm.vision.job import VisionJob

            # image URIs on the manifest's object store are read with its connection
            return VisionJob(image_fs=input_fs, **arguments)
        from airflow_hfllm.run.job import TextJob

        return TextJob(**arguments)

    @staticmethod
    def _template_context(context: Context) -> dict:
        """What a template of this task can read: the context, over the DAG's ``user_defined_macros``
        (as in Airflow's own rendering)."""
        dag = context.get("dag")
        return {**(getattr(dag, "user_defined_macros", None) or {}), **context}

    @staticmethod
    def _run_info(context: Context) -> dict:
        ti = context["ti"]
        logical_date = context.get("logical_date")
        return {
            "dag_id": ti.dag_id, "run_id": ti.run_id, "task_id": ti.task_id,
            "map_index": ti.map_index, "try_number": ti.try_number,
            "logical_date": logical_date.isoformat() if logical_date else None,
        }

    def execute(self, context: Context) -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        from airflow_hfllm.engine.cache import MODEL_CACHE
        from airflow_hfllm.engine.generate import Cancelled
        from airflow_hfllm.gpu import claim_gpu
        from airflow_hfllm.io.dataset import InputError
        from airflow_hfllm.run.job import ErrorRateExceeded

        # Before anything starts CUDA: on a worker with several GPUs, take one no other task holds.
        self._gpu = claim_gpu()
        self._job = self.build_job(context)
        self._manifest = None
        try:
            manifest = self._job.run()
        except (InputError, ErrorRateExceeded) as exc:
            # The same input fails the same way on every try: no retries. Over the error rate, the
            # output is written: its counts go to lineage with the failure.
            self._manifest = getattr(exc, "manifest", None)
            raise AirflowFailException(str(exc)) from exc
        except Cancelled:
            manifest = None  # on_kill only set a flag: the GPU is freed below
        if manifest is None:
            # Outside the except block: its traceback holds run()'s frames, and so the model and the KV
            # cache, until the block ends. Freed here, in the thread that owns them.
            MODEL_CACHE.clear()
            raise RuntimeError("generation stopped by on_kill; parts written so far are kept for the retry")
        if self.output_asset is not None and self.shard is None:
            logical_date = context.get("logical_date")
            context["outlet_events"][self.output_asset].extra = {
                "partition": logical_date.date().isoformat() if logical_date else context["run_id"],
                "output": manifest["output"], "rows": manifest["counts"]["rows"],
                "fingerprint": manifest["fingerprint"],
            }
        self._manifest = manifest
        return manifest

    def on_kill(self) -> None:
        if self._job is not None:
            self._job.cancel()

    def _model_spec_for_lineage(self) -> dict:
        """The model as the task was asked for it, before a manifest says what was loaded."""
        from airflow_hfllm.config import normalize_quantization

        return {"model": self.base_model, "revision": self.revision or None, "dtype": self.dtype,
                "quantization": normalize_quantization(self.quantization),
                "adapter": getattr(self, "peft_model", None) or None}  # vision operators take none

    def _lineage(self, manifest: dict | None):
        # Only the OpenLineage provider calls these methods: its imports stay out of DAG parsing.
        from airflow_hfllm.operators.lineage import generate_lineage

        from airflow_hfllm.run.manifest import Manifest

        manifest = Manifest.from_dict(manifest) if manifest else None
        return generate_lineage(self.input_path, self.output_path, self._model_spec_for_lineage(), manifest,
                                output_files=fs_and_path(self.output_path), log=self.log)

    def get_openlineage_facets_on_start(self):
        """Input, model and output datasets (templates are rendered by then)."""
        return self._lineage(None)

    def get_openlineage_facets_on_complete(self, task_instance):
        """As at start, plus the output's schema and statistics and the run's counts, tokens and timings
        from the manifest. No prompt or output text, no credentials."""
        return self._lineage(self._manifest)

    def get_openlineage_facets_on_failure(self, task_instance):
        """As at start; when the task failed on ``max_error_rate`` after writing everything, also the
        output's statistics and the run's counts (how many rows ended in error)."""
        return self._lineage(self._manifest)
