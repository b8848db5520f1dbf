"""``make_tiny_model(path, kind)``: the tiny model of any kind, from :mod:`.text` or :mod:`.vision`."""

from __future__ import annotations

import os
import pathlib

from airflow_hfllm.testing import KINDS, SAFETY_KINDS, VERDICTS


def make_tiny_model(
    path: str | os.PathLike,
    kind: str = "causal-lm",
    *,
    seed: int = 0,
    verdict: str | None = None,
) -> pathlib.Path:
    """Write a tiny random model of ``kind`` plus its tokenizer (and image processor) into ``path``.

    ``verdict`` (safety kinds only): the checker always answers it, whatever the input.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; allowed: {', '.join(KINDS)}")
    if verdict is not None and verdict not in VERDICTS:
        raise ValueError(f"unknown verdict {verdict!r}; allowed: None, {', '.join(VERDICTS)}")
    if verdict is not None and kind not in SAFETY_KINDS:
        raise ValueError(f"verdict applies only to the safety kinds {', '.join(SAFETY_KINDS)}")
    if kind == "vision":
        from airflow_hfllm.testing.vision import make_tiny_vision_model

        return make_tiny_vision_model(path, seed=seed)
    from airflow_hfllm.testing.text import make_text_model

    return make_text_model(path, kind, seed=seed, verdict=verdict)
