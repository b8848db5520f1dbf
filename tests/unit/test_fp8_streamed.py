"""quantization="fp8" loads a plain checkpoint one decoder layer at a time (engine/streamed.py): the same FP8
model, bit for bit, as loading it whole and quantizing after, for dense families, a sharded checkpoint and
tied embeddings; layer by layer indeed; and the checkpoints it does not apply to load whole, saying why."""

import logging

import pytest
import torch

from airflow_hfllm.config import ModelSpec
from airflow_hfllm.engine import fp8, streamed
from airflow_hfllm.engine.arch.layer import text_model
from airflow_hfllm.engine.loading import load
from airflow_hfllm.testing.families import make_family_model

SPEC = dict(dtype="bfloat16", quantization="fp8")


def whole(monkeypatch, path):
    """The model loaded whole and then quantized (the path before layer-by-layer loading)."""
    with monkeypatch.context() as m:
        m.setattr(streamed, "load", lambda *args: None)
        return load(ModelSpec(path, **SPEC)).model


def assert_same(got, want):
    got_state, want_state = got.state_dict(), want.state_dict()
    assert list(got_state) == list(want_state)
    for name, tensor in want_state.items():
        assert got_state[name].dtype == tensor.dtype and got_state[name].shape == tensor.shape, name
        assert torch.equal(got_state[name].view(torch.uint8), tensor.view(torch.uint8)), name
    ids = torch.tensor([[5, 9, 14, 3, 22, 41, 7, 8, 30, 2] * 4])
    with torch.no_grad():
        assert torch.equal(got(ids).logits, want(ids).logits)
    assert got.generation_config.eos_token_id == want.generation_config.eos_token_id
    assert got.config.get_text_config().num_hidden_layers == len(text_model(got).layers)


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "gemma3-text", "mistral-window"])
def test_layer_by_layer_equals_whole_then_quantized(family, tmp_path, monkeypatch, caplog):
    path = str(make_family_model(tmp_path / family, family))
    with caplog.at_level(logging.INFO, logger="airflow_hfllm"):
        got = load(ModelSpec(path, **SPEC)).model
    assert "loaded layer by layer into FP8" in caplog.text
    assert sum(isinstance(m, fp8.Fp8Linear) for m in got.modules()) > 0
    assert_same(got, whole(monkeypatch, path))


def test_sharded_checkpoint_with_tied_embeddings(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    src = make_family_model(tmp_path / "src", "llama")
    model = AutoModelForCausalLM.from_pretrained(src)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    path = tmp_path / "tied"
    model.save_pretrained(path, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).exists():
            (path / name).write_bytes((src / name).read_bytes())
    assert (path / streamed.INDEX).exists()  # sharded
    got = load(ModelSpec(str(path), **SPEC)).model
    assert got.lm_head.weight.data_ptr() == got.get_input_embeddings().weight.data_ptr()
    assert_same(got, whole(monkeypatch, str(path)))


def test_each_layer_is_quantized_before_the_next_is_read(tmp_path, monkeypatch):
    import re

    path = str(make_family_model(tmp_path / "llama", "llama"))
    events, read, quantize = [], streamed.Reader.__call__, fp8.quantize_layer

    def reading(self, name, device, dtype):
        layer = re.search(r"\.layers\.(\d+)\.", name)
        events.append(("read", int(layer.group(1))) if layer else ("read", None))
        return read(self, name, device, dtype)

    def quantizing(layer):
        events.append(("quantize", None))
        return quantize(layer)

    monkeypatch.setattr(streamed.Reader, "__call__", reading)
    monkeypatch.setattr(fp8, "quantize_layer", quantizing)
    load(ModelSpec(path, **SPEC))
    order = [e for i, e in enumerate(events) if i == 0 or e != events[i - 1]]  # runs of one event, once
    assert order == [("read", None), ("read", 0), ("quantize", None), ("read", 1), ("quantize", None)]


def test_moe_checkpoint_loads_whole_and_says_why(tmp_path, caplog):
    path = str(make_family_model(tmp_path / "moe", "qwen3-moe"))
    with caplog.at_level(logging.INFO, logger="airflow_hfllm"):
        got = load(ModelSpec(path, **SPEC)).model
    assert "not layer by layer: the checkpoint names its tensors otherwise" in caplog.text
    assert sum(isinstance(m, fp8.Fp8Linear) for m in got.modules()) > 0
