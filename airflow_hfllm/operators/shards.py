"""Plan and merge shards of one input, for generation spread over several tasks (and GPUs)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from airflow.sdk import BaseOperator

from airflow_hfllm.config import JobConfig
from airflow_hfllm.operators.base import fs_and_path

if TYPE_CHECKING:
    from airflow.sdk import Context


class HFShardPlanOperator(BaseOperator):
    """
    Check the input once (columns, ids unique across every file) and cut it into shards on chunk
    boundaries, balanced by rows. Returns ``[{"shard": {...}}, ...]`` for
    ``HFTextGenerateOperator.partial(...).expand_kwargs(plan.output)``.

    :param input_path: as the generate operator's (templated).
    :param shards: how many shards (at most one per chunk). Templated (``"{{ params.shards }}"``); a
        rendered string is read as an integer.
    :param chunk_rows: must equal the generate operator's ``chunk_rows``.
    :param id_column: unique join key column.
    :param required_columns: columns every input file must have (default: id and prompt).
    :param seed: sampling seed for every shard; ``None`` draws one here, so all shards share it.
    """

    template_fields: Sequence[str] = ("input_path", "shards")

    def __init__(self, *, input_path: Any, shards: int | str, chunk_rows: int = JobConfig.chunk_rows,
                 id_column: str = JobConfig.id_column,
                 required_columns: Sequence[str] = ("prompt",), seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.input_path = input_path
        self.shards = shards
        self.chunk_rows = chunk_rows
        self.id_column = id_column
        self.required_columns = list(required_columns)
        self.seed = seed

    def execute(self, context: Context) -> list[dict]:
        from airflow_hfllm.io.dataset import Dataset
        from airflow_hfllm.run.shards import plan_shards

        fs, path = fs_and_path(self.input_path)
        dataset = Dataset.open(path, fs, required=[self.id_column, *self.required_columns], id_column=self.id_column)
        plan = plan_shards(dataset, self.chunk_rows, int(self.shards), self.seed)
        self.log.info("%d rows in %d chunks -> %d shards: %s", dataset.rows, dataset.num_chunks(self.chunk_rows),
                      len(plan), [(s["first_chunk"], s["end_chunk"], s["rows"]) for s in plan])
        return [{"shard": shard} for shard in plan]

    def get_openlineage_facets_on_start(self):
        from airflow_hfllm.operators.lineage import shard_plan_lineage

        return shard_plan_lineage(self.input_path)


class HFMergeShardsOperator(BaseOperator):
    """
    Once every shard has run: check that every chunk is committed with one fingerprint and write
    ``_manifest.json``; returns it (counts, tokens, per-shard seconds, never rows).

    :param output_path: the generate operator's ``output_path`` (templated).
    """

    template_fields: Sequence[str] = ("output_path",)

    def __init__(self, *, output_path: Any, **kwargs):
        super().__init__(**kwargs)
        self.output_path = output_path
        self._manifest = None  # kept for the OpenLineage facets

    def execute(self, context: Context) -> dict:
        from airflow_hfllm.io.parts import OutputDir
        from airflow_hfllm.run.manifest import merge_shards

        fs, path = fs_and_path(self.output_path)
        if fs is None:
            from airflow_hfllm.io.dataset import to_fs

            fs, path = to_fs(path)
        manifest = merge_shards(OutputDir(fs, path))
        self.log.info("merged %d shards: %d rows in %d parts", len(manifest.shards), manifest.rows, len(manifest.parts))
        self._manifest = manifest.to_dict()
        return self._manifest

    def get_openlineage_facets_on_start(self):
        from airflow_hfllm.operators.lineage import merge_lineage

        return merge_lineage(self.output_path, None)

    def get_openlineage_facets_on_complete(self, task_instance):
        """The merged output's row and part counts over every shard."""
        from airflow_hfllm.operators.lineage import merge_lineage

        from airflow_hfllm.run.manifest import Manifest

        return merge_lineage(self.output_path, Manifest.from_dict(self._manifest) if self._manifest else None)
