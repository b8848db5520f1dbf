"""Running a job, one concept a module, in the order of the data:

* :mod:`~airflow_hfllm.run.job`: :class:`~airflow_hfllm.run.job.Job` and :class:`~airflow_hfllm.run.job.TextJob`,
  the loop (load, chunks through an engine, a part per chunk, the manifest).
* :mod:`~airflow_hfllm.run.kinds`: what a kind of job is (:class:`~airflow_hfllm.run.kinds.TextKind`; vision's
  is in :mod:`airflow_hfllm.vision.job`).
* :mod:`~airflow_hfllm.run.rows`: a chunk's steps over one record per row (prompt, checks, request, table).
* :mod:`~airflow_hfllm.run.engines`: which engine runs the job, and one way to drive either.
* :mod:`~airflow_hfllm.run.state`: the output folder's job state (fingerprint, resume, ownership, attempts).
* :mod:`~airflow_hfllm.run.manifest`: the manifest, and the merge of shard summaries.
* :mod:`~airflow_hfllm.run.shards`: planning shards on chunk boundaries.
* :mod:`~airflow_hfllm.run.progress`: progress lines.
"""
