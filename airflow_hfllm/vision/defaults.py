"""Defaults of vision jobs, in a module that imports nothing: :mod:`airflow_hfllm.jobs` and the
operator read them without loading the vision code."""

DEFAULT_MIN_PIXELS = 224 * 28 * 28
DEFAULT_MAX_PIXELS = 1280 * 28 * 28
DEFAULT_MAX_BYTES = 64 * 2**20
