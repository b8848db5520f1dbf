"""Batch generation with open HuggingFace models, as Apache Airflow operators and a CLI."""

__version__ = "0.1.0"
