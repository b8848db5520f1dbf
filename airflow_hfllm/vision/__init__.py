"""Vision-language generation (Qwen2.5-VL and alike), one concept a module:

* :mod:`~airflow_hfllm.vision.sources`: manifest cells -> image sources, the scheme policy, reading bytes.
* :mod:`~airflow_hfllm.vision.resize`: Qwen's ``smart_resize`` arithmetic, the ``qwen_vl_utils`` and PIL resizes.
* :mod:`~airflow_hfllm.vision.images`: :class:`~airflow_hfllm.vision.images.ImageLoader` (check, probe, load).
* :mod:`~airflow_hfllm.vision.processor`: the model and its processor, built from its parts where needed.
* :mod:`~airflow_hfllm.vision.requests`: a row's messages and probed images -> a generation request.
* :mod:`~airflow_hfllm.vision.generator`: :class:`~airflow_hfllm.vision.generator.VisionGenerator`, padded
  batches of ``generate()``.
* :mod:`~airflow_hfllm.vision.fast`: :class:`~airflow_hfllm.vision.fast.VisionFastEngine`, the fast engine over images.
* :mod:`~airflow_hfllm.vision.attention`: packed attention for the vision tower.
* :mod:`~airflow_hfllm.vision.job`: :class:`~airflow_hfllm.vision.job.VisionKind` (what a vision row is) and
  :class:`~airflow_hfllm.vision.job.VisionJob`, the job over an image manifest.

Nothing is imported here: ``import airflow_hfllm.run.job`` and text jobs load none of it.
"""
