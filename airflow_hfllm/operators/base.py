"""What the generate operators share: parameters, hub connection, GPU claim, failure handling, assets."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any, Sequence

from airflow.sdk import BaseOperator

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


class HFGenerateBaseOperator(BaseOperator):
    """
    Base of :class:`~airflow_hfllm.operators.text.HFTextGenerateOperator` and
    :class:`~airflow_hfllm.operators.vision.HFVisionGenerateOperator`: subclasses build the job.

    :param input_path: Parquet file, folder or glob; local path, ``ObjectStoragePath`` or URI
        (``s3://conn_id@bucket/key``). Templated.
    :param output_path: output folder, same forms. Templated (e.g. ``.../ds={{ ds }}``).
    :param base_model: hub id or local folder of the model. Templated.
    :param quantization: ``None``, ``"8bit"`` or ``"4bit"`` (bitsandbytes); ``True`` means 8-bit.
    :param enable_salesforce_content_safety: check prompts and outputs with ``salesforce_safety_model``.
        Templated.
    :param salesforce_safety_model: the seq2seq safety model for the shorthand above.
    :param safety_checkers: more checkers: ``"KIND:MODEL"`` strings, dicts or ``SafetyChecker`` objects
        (or a template rendering to such a list).
    :param on_unsafe_output: ``"redact"`` (output null) or ``"keep"``.
    :param id_column: unique join key column.
    :param prompt_column: prompt string column.
    :param system_prompt: system message for every row. Templated.
    :param prompt_template: Jinja building each row's prompt, rendered by the job once per row with the
        row as ``row`` (``"Summarise: {{ row.text | trim }}"``) and this task's template context
        (``{{ ds }}``, ``{{ params.x }}``, the DAG's ``user_defined_macros``); the values it reads from
        the context are part of the output's fingerprint. A column it reads that the input lacks fails
        the task before any model loads. The UI's Rendered Templates tab shows it as written.
    :param keep_columns: input columns copied to the output.
    :param chunk_rows: rows per input chunk and output part (the unit of retry).
    :param batch_size: cap on rows per GPU batch; a token budget does the rest.
    :param max_new_tokens: tokens to generate per row (a ``max_new_tokens`` column overrides per row).
        Templated.
    :param do_sample: sample (True) or greedy (False).
    :param temperature: sampling temperature. Templated.
    :param top_p: nucleus sampling mass.
    :param top_k: top-k sampling (0 turns it off).
    :param repetition_penalty: 1.0 is none.
    :param min_length: minimum new tokens.
    :param length_penalty: beam search only.
    :param use_cache: KV cache during generation.
    :param seed: sampling seed; ``None`` draws one, recorded in the manifest and reused by retries.
    :param stop: stop strings.
    :param max_padding_length: longest prompt in tokens; longer rows get an ``error``.
    :param dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``bfloat16``, ``float16``, ``float32``.
    :param revision: model revision.
    :param trust_remote_code: run code shipped with the model (off by default).
    :param hf_conn_id: ``huggingface`` connection: token, cache dir, offline flag.
    :param max_error_rate: fail the task (after writing) when more rows than this share end in error.
    :param progress_every: seconds between progress lines in the task log.
    :param engine: ``auto`` (the fast engine on a GPU when the model allows: continuous batching, static
        KV cache, CUDA-graph decode; else padded ``generate()`` batches), ``fast`` or ``batched``.
    :param input_fingerprint: ``metadata`` (each input file's size and etag or mtime) or ``content``
        (a SHA-256 of every input file, read on each run: notices files rewritten in place with size and
        mtime kept, as ``cp -p`` and ``rsync -t`` do).
    :param replace_foreign_files: delete files in the output folder that this package did not write
        (off: such a folder is refused, since its readers would mix those files with the rows).
    :param shard: one entry of :class:`~airflow_hfllm.operators.shards.HFShardPlanOperator`'s plan (use
        ``.expand_kwargs(plan.output)``): this task then generates its own chunks only and writes a
        shard summary; :class:`~airflow_hfllm.operators.shards.HFMergeShardsOperator` writes the manifest.
    :param output_asset: an ``Asset`` (or its URI) for the output root, added to ``outlets``: each run
        emits an asset event whose extra names the partition written (logical date or run id), the
        output folder and the counts, so downstream DAGs can be scheduled on it.
    """

    template_fields: Sequence[str] = (
        "input_path", "output_path", "base_model", "revision", "system_prompt", "prompt_template",
        "max_new_tokens", "temperature", "safety_checkers", "enable_salesforce_content_safety",
    )
    template_fields_renderers = {"prompt_template": "jinja", "system_prompt": "md"}

    def __init__(
        self,
        *,
        input_path: Any,
        output_path: Any,
        base_model: str,
        quantization: bool | str | None = None,
        enable_salesforce_content_safety: bool = False,
        salesforce_safety_model: str = "Salesforce/safety-flan-t5-base",
        safety_checkers: Sequence[Any] | str = (),
        on_unsafe_output: str = "redact",
        id_column: str = "id",
        prompt_column: str | None = "prompt",
        system_prompt: str | None = None,
        prompt_template: str | None = None,
        keep_columns: Sequence[str] = (),
        chunk_rows: int = 1000,
        batch_size: int | None = None,
        max_new_tokens: int | str = 1024,
        do_sample: bool = True,
        temperature: float | str = 0.6,
        top_p: float = 0.9,
        top_k: int = 50,
        repetition_penalty: float = 1.0,
        min_length: int | None = None,
        length_penalty: float = 1.0,
        use_cache: bool = True,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        max_padding_length: int | None = None,
        dtype: str = "auto",
        revision: str | None = None,
        trust_remote_code: bool = False,
        hf_conn_id: str | None = HuggingFaceHook.default_conn_name,
        max_error_rate: float = 0.05,
        progress_every: float = 5.0,
        engine: str = "auto",
        input_fingerprint: str = "metadata",
        replace_foreign_files: bool = False,
        shard: dict | None = None,
        output_asset: Any = None,
        **kwargs,
    ):
        if output_asset is not None:
            from airflow.sdk import Asset

            if not isinstance(output_asset, Asset):
                output_asset = Asset(uri=str(output_asset), name=str(output_asset))
            kwargs["outlets"] = [*kwargs.get("outlets", []), output_asset]
        super().__init__(**kwargs)
        self.input_path = input_path
        self.output_path = output_path
        self.base_model = base_model
        self.quantization = quantization
        self.enable_salesforce_content_safety = enable_salesforce_content_safety
        self.salesforce_safety_model = salesforce_safety_model
        self.safety_checkers = safety_checkers  # a list, or a template rendering to one
        self.on_unsafe_output = on_unsafe_output
        self.id_column = id_column
        self.prompt_column = prompt_column
        self.system_prompt = system_prompt
        self.prompt_template = prompt_template
        self.keep_columns = list(keep_columns)
        self.chunk_rows = chunk_rows
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.do_sample = do_sample
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.repetition_penalty = repetition_penalty
        self.min_length = min_length
        self.length_penalty = length_penalty
        self.use_cache = use_cache
        self.seed = seed
        self.stop = list(stop or [])
        self.max_padding_length = max_padding_length
        self.dtype = dtype
        self.revision = revision
        self.trust_remote_code = trust_remote_code
        self.hf_conn_id = hf_conn_id
        self.max_error_rate = max_error_rate
        self.progress_every = progress_every
        self.engine = engine
        self.input_fingerprint = input_fingerprint
        self.replace_foreign_files = replace_foreign_files
        self.shard = shard
        self.output_asset = output_asset
        self._job = None
        self._manifest = None  # kept for the OpenLineage facets of the finished run

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
        """The job this task runs (a :class:`~airflow_hfllm.jobs.Job`)."""
        raise NotImplementedError

    def job_arguments(self, context: Context) -> dict:
        """The :class:`~airflow_hfllm.jobs.Job` arguments every kind shares."""
        from airflow_hfllm.config import GenerationParams

        input_fs, input_path = fs_and_path(self.input_path)
        output_fs, output_path = fs_and_path(self.output_path)
        checkers = self.safety_checkers
        checkers = [checkers] if isinstance(checkers, str) else list(checkers or [])
        if self.enable_salesforce_content_safety in (True, "True", "true"):
            checkers.insert(0, f"salesforce:{self.salesforce_safety_model}")
        return dict(
            input=input_path,
            input_fs=input_fs,
            output=output_path,
            output_fs=output_fs,
            params=GenerationParams(
                max_new_tokens=int(self.max_new_tokens), do_sample=self.do_sample,
                temperature=float(self.temperature), top_p=self.top_p, top_k=self.top_k,
                repetition_penalty=self.repetition_penalty, min_length=self.min_length,
                use_cache=self.use_cache, seed=self.seed, stop=tuple(self.stop),
                length_penalty=self.length_penalty,
            ),
            id_column=self.id_column,
            prompt_column=self.prompt_column,
            system_prompt=self.system_prompt or None,
            prompt_template=self.prompt_template or None,
            template_context=self._template_context(context) if self.prompt_template else {},
            keep_columns=self.keep_columns,
            chunk_rows=self.chunk_rows,
            batch_size=self.batch_size,
            max_prompt_tokens=self.max_padding_length,
            safety_checkers=checkers,
            on_unsafe_output=self.on_unsafe_output,
            max_error_rate=self.max_error_rate,
            hub=self.hook.get_conn(),
            run_info=self._run_info(context),
            logger=self.log,
            progress_every=self.progress_every,
            engine=self.engine,
            input_fingerprint=self.input_fingerprint,
            replace_foreign_files=self.replace_foreign_files,
            shard=self.shard,
        )

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
        from airflow_hfllm.jobs import ErrorRateExceeded

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
                "adapter": getattr(self, "peft_model", None) or None}

    def _lineage(self, manifest: dict | None):
        # Only the OpenLineage provider calls these methods: its imports stay out of DAG parsing.
        from airflow_hfllm.operators.lineage import generate_lineage

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
