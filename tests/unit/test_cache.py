"""The process model cache: one load per spec, even from several threads."""

import threading
import time

import pytest

from airflow_hfllm.engine.cache import ModelCache
from airflow_hfllm.engine.loading import get_model
from airflow_hfllm.config import ModelSpec, normalize_quantization


def test_one_load_per_key_across_threads():
    cache, loads = ModelCache(), []

    def load():
        loads.append(1)
        time.sleep(0.05)
        return object()

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("k", load))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(loads) == 1 and len({id(r) for r in results}) == 1
    assert cache.evict("k") and "k" not in cache and not cache.evict("k")


def test_spec_is_the_key(tiny_lm):
    cache = ModelCache()
    a = get_model(ModelSpec(tiny_lm), cache=cache)
    assert get_model(ModelSpec(tiny_lm), cache=cache) is a
    b = get_model(ModelSpec(tiny_lm, dtype="bfloat16"), cache=cache)
    assert b is not a and len(cache) == 2
    assert str(b.model.dtype) == "torch.bfloat16" and str(a.model.dtype) == "torch.float32"
    assert not a.model.training
    cache.clear()
    assert len(cache) == 0


def test_spec_key_covers_what_changes_the_weights_and_only_that():
    """Equal models give equal keys (one load); options that change the weights give other keys.
    Loading through the cache with quantization and adapters: tests/unit/test_quant_adapters.py."""
    assert ModelSpec("m", quantization=True) == ModelSpec("m", quantization="8bit") != ModelSpec("m")
    assert ModelSpec("m", quantization="none") == ModelSpec("m", quantization=False) == ModelSpec("m")
    assert ModelSpec("m", quantization="4bit") == ModelSpec("m", quantization="nf4", double_quant=True)
    assert ModelSpec("m", quantization="4bit").double_quant is True
    assert ModelSpec("m", quantization="4bit", double_quant=False) != ModelSpec("m", quantization="4bit")
    # double quantization means nothing unless 4-bit; merging means nothing without an adapter
    assert ModelSpec("m", quantization="8bit", double_quant=False) == ModelSpec("m", quantization="8bit")
    assert ModelSpec("m", double_quant=True).double_quant is None
    assert ModelSpec("m", merge_adapter=False) == ModelSpec("m") == ModelSpec("m", adapter="")
    assert ModelSpec("m", adapter="a") != ModelSpec("m") and ModelSpec("m", adapter="a") != ModelSpec("m", adapter="b")
    assert ModelSpec("m", adapter="a", merge_adapter=False) != ModelSpec("m", adapter="a")
    # adapters over quantized weights stay unmerged, whatever was asked
    assert ModelSpec("m", quantization="4bit", adapter="a").merge_adapter is False
    assert ModelSpec("m", quantization="8bit", adapter="a", merge_adapter=True) == \
        ModelSpec("m", quantization="8bit", adapter="a", merge_adapter=False)
    assert ModelSpec("m", quantization="4bit", adapter="a").to_dict() == dict(
        model="m", revision=None, dtype="auto", quantization="4bit", double_quant=True, adapter="a",
        merge_adapter=False, trust_remote_code=False, task="causal-lm")


def test_quantization_names():
    assert normalize_quantization(True) == "8bit" and normalize_quantization(None) is None
    assert normalize_quantization("nf4") == "4bit"
    with pytest.raises(ValueError, match="quantization must be one of"):
        normalize_quantization("3bit")
    with pytest.raises(ValueError, match="dtype must be one of"):
        ModelSpec("m", dtype="int8")
