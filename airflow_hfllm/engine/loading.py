"""Loading models through ``from_pretrained``: dtype, device, quantization, adapters, hub options."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from airflow_hfllm.engine.cache import MODEL_CACHE, ModelCache
from airflow_hfllm.engine.spec import ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HubOptions:
    """Where and how to reach the hub. Not part of the cache key; the token is never logged.

    :param cache_dir: on-disk HF cache (defaults to ``HF_HOME``/``HF_HUB_CACHE``); may be a volume
        shared by all GPU workers.
    :param token: hub token for gated models.
    :param local_files_only: never touch the network (air-gapped workers).
    """

    cache_dir: str | None = None
    token: str | None = field(default=None, repr=False)
    local_files_only: bool = False

    @classmethod
    def from_env(cls) -> "HubOptions":
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        return cls(
            cache_dir=os.environ.get("HFLLM_CACHE_DIR") or None,
            token=os.environ.get("HF_TOKEN") or None,
            local_files_only=offline,
        )

    def kwargs(self) -> dict:
        return {"cache_dir": self.cache_dir, "token": self.token, "local_files_only": self.local_files_only}


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: Any
    tokenizer: Any
    device: Any
    dtype: Any
    load_seconds: float


def device_and_dtype(spec: ModelSpec):
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.dtype != "auto":
        dtype = getattr(torch, spec.dtype)
    elif device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.float32
    return device, dtype


def quantization_config(spec: ModelSpec, dtype):
    if spec.quantization is None:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            f"quantization={spec.quantization!r} needs bitsandbytes: pip install bitsandbytes"
        ) from exc
    from transformers import BitsAndBytesConfig

    if spec.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=True,
    )


AUTO_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "classifier": "AutoModelForSequenceClassification",
}


def load(spec: ModelSpec, hub: HubOptions | None = None) -> LoadedModel:
    """Load tokenizer and model for ``spec`` (no caching; see :func:`get_model`)."""
    import torch
    import transformers

    hub = hub or HubOptions.from_env()
    started = time.monotonic()
    device, dtype = device_and_dtype(spec)
    common = dict(revision=spec.revision, trust_remote_code=spec.trust_remote_code, **hub.kwargs())
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec.model, **common)
    auto_class = getattr(transformers, AUTO_CLASSES[spec.task])
    kwargs = dict(common, dtype=dtype, use_safetensors=True)
    quant = quantization_config(spec, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
    if device.type == "cuda":
        kwargs["device_map"] = "auto"
    log.info(
        "loading %s %s (revision=%s, dtype=%s, quantization=%s, adapter=%s) on %s",
        spec.task, spec.model, spec.revision, str(dtype).removeprefix("torch."), spec.quantization,
        spec.adapter, device,
    )
    model = auto_class.from_pretrained(spec.model, **kwargs)
    if spec.adapter:
        model = attach_adapter(model, spec, hub)
    if device.type != "cuda" and quant is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    if spec.task == "causal-lm":
        prepare_tokenizer(tokenizer, model)
    seconds = time.monotonic() - started
    log.info("loaded %s in %.1f s", spec.model, seconds)
    return LoadedModel(spec, model, tokenizer, device, dtype, seconds)


def attach_adapter(model, spec: ModelSpec, hub: HubOptions):
    try:
        from peft import PeftConfig, PeftModel
    except ImportError as exc:
        raise RuntimeError("peft_model needs the peft package: pip install peft") from exc
    config = PeftConfig.from_pretrained(spec.adapter, revision=None, **hub.kwargs())
    base = config.base_model_name_or_path
    if base and not same_model(base, spec.model):
        raise ValueError(
            f"adapter {spec.adapter} was trained on base model {base!r}, not {spec.model!r}"
        )
    model = PeftModel.from_pretrained(model, spec.adapter, **hub.kwargs())
    if spec.merge_adapter:
        model = model.merge_and_unload()
    return model


def same_model(a: str, b: str) -> bool:
    norm = lambda s: os.path.normpath(os.path.expanduser(s)).rstrip("/")  # noqa: E731
    return norm(a) == norm(b) or os.path.basename(norm(a)) == os.path.basename(norm(b))


def prepare_tokenizer(tokenizer, model) -> None:
    """Left padding (decoder-only batches) and a pad token."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        eos = tokenizer.eos_token_id
        if eos is None:
            eos = model.generation_config.eos_token_id
            eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        tokenizer.pad_token_id = eos


def get_model(spec: ModelSpec, hub: HubOptions | None = None, cache: ModelCache = MODEL_CACHE) -> LoadedModel:
    """``spec``'s model from the process cache, loading it on first use."""
    return cache.get(spec, lambda: load(spec, hub))
