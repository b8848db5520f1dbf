"""A bf16 (or fp16, fp32) checkpoint loaded into FP8 one decoder layer at a time (``quantization="fp8"``).

``from_pretrained`` followed by :func:`~airflow_hfllm.engine.fp8.quantize_model` holds the whole model in its
load dtype on the device first: a 70B model's 140 GB of bf16 does not fit one H200, although its FP8 weights
(70 GB) do. Here the model is built with one decoder layer (embeddings, final norm, ``lm_head`` and the rotary
tables on the device, then loaded from the checkpoint), and each layer is then built empty, filled from the
checkpoint's safetensors (read tensor by tensor: the host holds one tensor at a time, not the checkpoint),
quantized (:func:`~airflow_hfllm.engine.fp8.quantize_layer`) and kept. The device peaks at the FP8 model plus
one layer in the load dtype; the weights are the ones the in-memory path gives, bit for bit.

It applies to a checkpoint whose tensor names are the model's own (dense Llama, Qwen2/3, Mistral, Phi-3,
Gemma 3 text and the like). Anything else, such as MoE checkpoints whose per-expert tensors transformers
fuses while loading, or models that keep some modules in fp32, takes the in-memory path, and the log says
why (:func:`load`).
"""

from __future__ import annotations

import copy
import json
import logging
from contextlib import contextmanager

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def checkpoint_files(model: str, common: dict) -> dict[str, str] | None:
    """Each tensor name of ``model``'s safetensors checkpoint (a folder or a hub repository, ``common``
    holding the revision and hub options) and the local file holding it; ``None`` without one."""
    from transformers.utils import cached_file

    options = dict(_hub(common), _raise_exceptions_for_missing_entries=False)
    index = cached_file(model, INDEX, **options)
    if index is not None:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files = {name: cached_file(model, name, **options) for name in sorted(set(weight_map.values()))}
        return {tensor: files[name] for tensor, name in weight_map.items()}
    single = cached_file(model, SINGLE, **options)
    if single is None:
        return None
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


@contextmanager
def default_dtype(dtype):
    import torch

    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


class Reader:
    """Tensors of a safetensors checkpoint by name, its files opened once each."""

    def __init__(self, files: dict[str, str]):
        self.files, self.open = files, {}

    def __call__(self, name: str, device, dtype):
        from safetensors import safe_open

        path = self.files[name]
        if path not in self.open:
            self.open[path] = safe_open(path, framework="pt")
        return self.open[path].get_tensor(name).to(device=device, dtype=dtype)


def load(auto_class, model_name: str, config, common: dict, device, dtype):
    """``model_name`` built and filled layer by layer with its decoder's linear layers in FP8 on ``device``
    (the module docstring), or ``None`` (logged why) where it does not apply: then load it whole and quantize
    it after (``engine/loading.py``)."""
    import torch
    from transformers import GenerationConfig

    from airflow_hfllm.engine.arch.layer import text_config, text_model
    from airflow_hfllm.engine.fp8 import _release, quantize_layer

    files = checkpoint_files(model_name, common)
    if files is None:
        return _not(model_name, "no safetensors checkpoint")
    config = copy.deepcopy(config)
    full = text_config(config)
    layers, layer_types = full.num_hidden_layers, getattr(full, "layer_types", None)
    full.num_hidden_layers = 1
    if layer_types:
        full.layer_types = layer_types[:1]
    with torch.device(device):
        model = auto_class.from_config(config, dtype=dtype)
    full = text_config(model.config)  # from_config's copy, with its attention implementation set
    full.num_hidden_layers = layers
    if layer_types:  # the rope tables were built for the first layer's type only (Gemma 3's differ by type)
        full.layer_types = layer_types
        for name, module in list(text_model(model).named_children()):
            if type(module).__name__.endswith("RotaryEmbedding"):
                with torch.device(device):
                    setattr(text_model(model), name, type(module)(config=full))
    if getattr(model, "_keep_in_fp32_modules", None) or getattr(model, "_keep_in_fp32_modules_strict", None):
        return _not(model_name, "it keeps modules in fp32")
    stack = text_model(model)
    prefix = next(name for name, module in model.named_modules() if module is stack) + ".layers."
    layer_class = type(stack.layers[0])
    stack.layers = torch.nn.ModuleList()  # the one built above goes
    rest = model.state_dict()
    tied = {name for name in rest if name not in files and _tied(model, name)}
    wanted = [f"{prefix}{i}.{name}" for i in range(layers) for name in _layer_names(layer_class, full, dtype, i)]
    missing = sorted(set(rest) - tied - set(files)) + [name for name in wanted if name not in files]
    if missing:
        return _not(model_name, f"the checkpoint names its tensors otherwise ({missing[0]!r} is not in it)")
    read = Reader(files)
    with torch.no_grad():
        model.load_state_dict({name: read(name, device, t.dtype) for name, t in rest.items() if name not in tied},
                              strict=False, assign=True)
        model.tie_weights()
        for i in range(layers):
            with torch.device("meta"), default_dtype(dtype):
                layer = layer_class(full, layer_idx=i)
            names = dict(layer.state_dict())
            layer.load_state_dict({name: read(f"{prefix}{i}.{name}", device, t.dtype) for name, t in names.items()},
                                  strict=True, assign=True)
            quantize_layer(layer)
            stack.layers.append(layer)
    try:
        model.generation_config = GenerationConfig.from_pretrained(model_name, **_hub(common))
    except OSError:  # no generation_config.json: what from_pretrained would derive
        model.generation_config = GenerationConfig.from_model_config(model.config)
    meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"{model_name}: streaming FP8 load left {meta[0]!r} unfilled")
    _release()
    return model


def _layer_names(layer_class, config, dtype, index: int) -> list[str]:
    """Decoder layer ``index``'s state-dict names (built on meta: no memory; layers may differ, as a MoE
    model's dense layers do)."""
    import torch

    with torch.device("meta"), default_dtype(dtype):
        return list(layer_class(config, layer_idx=index).state_dict())


def _tied(model, name: str) -> bool:
    """Whether ``name`` is the output embedding tied to the input embedding (then not in the checkpoint)."""
    output = model.get_output_embeddings()
    return bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False)) and output is not None \
        and name.endswith("lm_head.weight")


def _hub(common: dict) -> dict:
    return {k: v for k, v in common.items() if k != "trust_remote_code"}


def _not(model_name: str, why: str) -> None:
    log.info("%s: loaded whole, then quantized to FP8 (not layer by layer: %s)", model_name, why)
    return None

