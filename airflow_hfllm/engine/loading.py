"""Loading models through ``from_pretrained``: dtype, device, quantization, adapters, hub options."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from airflow_hfllm.engine.cache import MODEL_CACHE, ModelCache
from airflow_hfllm.config import HubOptions, ModelSpec

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: Any
    tokenizer: Any
    device: Any
    dtype: Any
    load_seconds: float


def device_and_dtype(spec: ModelSpec):
    """The device, and the dtype that ``dtype="auto"`` means there.

    Unquantized: bf16 on GPU (fp16 where bf16 is not supported), fp32 on CPU. 8-bit: fp16 on any device,
    since bitsandbytes' int8 matmul casts its input to fp16 and warns on every call when given another
    dtype. 4-bit: bf16 compute (fp16 on GPUs without bf16), the usual nf4 setting.
    """
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    half = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    if spec.dtype != "auto":
        dtype = getattr(torch, spec.dtype)
    elif spec.quantization == "8bit":
        dtype = torch.float16
    elif spec.quantization == "4bit" or device.type == "cuda":
        dtype = half
    else:
        dtype = torch.float32
    return device, dtype


def quantization_config(spec: ModelSpec, device, dtype):
    """``BitsAndBytesConfig`` for ``spec`` (``None`` when not quantized by bitsandbytes), after checking that
    ``device`` can run the mode: the installed bitsandbytes for 8bit and 4bit, FP8 matmuls for fp8 (whose
    weights are quantized while loading, ``engine/streamed.py``, or after it,
    :func:`~airflow_hfllm.engine.fp8.quantize_model`).

    :raises ImportError: bitsandbytes is not installed.
    :raises RuntimeError: this device cannot run the mode (no kernel or native library; no FP8 matmuls).
    """
    if spec.quantization == "fp8":
        from airflow_hfllm.engine.fp8 import check_device

        check_device(device)
        return None
    if spec.quantization is None:
        return None
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ImportError(f"quantization={spec.quantization!r} needs the bitsandbytes package "
                          f"(pip install bitsandbytes), which cannot be imported: {exc}") from exc
    check_quantization(bnb, spec, device, dtype)
    from transformers import BitsAndBytesConfig

    if spec.quantization == "8bit":
        from airflow_hfllm.engine.fp8 import capable

        if capable(device):  # measured on an H200, 7B standard batch: 4,013 tok/s int8, 23,490 FP8 compiled
            log.info("quantization='8bit' runs bitsandbytes' int8 matmuls; on this GPU quantization='fp8' also "
                     "keeps one byte a weight and generated about 6x faster (docs/benchmarks.md)")
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_use_double_quant=spec.double_quant)


def check_quantization(bnb, spec: ModelSpec, device, dtype) -> None:
    """Quantize and run one small layer on ``device`` now, so that a device (or a bitsandbytes build)
    that cannot serve the mode fails here with the reason, not halfway through loading or at the first
    batch."""
    import torch

    try:
        if spec.quantization == "8bit":
            layer, x_dtype = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False), torch.float16
        else:
            layer, x_dtype = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=dtype, quant_type="nf4",
                                               compress_statistics=spec.double_quant), dtype
        layer.to(device)(torch.ones(2, 64, dtype=x_dtype, device=device))
    except Exception as exc:
        raise RuntimeError(f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot run {spec.quantization} "
                           f"quantization on {device}: {type(exc).__name__}: {exc}") from exc


AUTO_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "classifier": "AutoModelForSequenceClassification",
    "vision": "AutoModelForImageTextToText",  # Qwen2.5-VL and other image-text-to-text models
}


_quiet_lock = threading.Lock()
_quiet_loads = 0
_bars_were_on = False


@contextmanager
def no_progress_bars():
    """transformers' and huggingface_hub's progress bars (downloads, "Loading weights") off for the
    block: in a task log each redraw is one more line, for nothing. Loads may overlap (threads): the
    bars come back, if they were on, when the last one ends."""
    from transformers.utils import logging as hf_logging

    global _quiet_loads, _bars_were_on
    with _quiet_lock:
        if _quiet_loads == 0:
            _bars_were_on = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
        _quiet_loads += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_loads -= 1
            if _quiet_loads == 0 and _bars_were_on:
                hf_logging.enable_progress_bar()


def load(spec: ModelSpec, hub: HubOptions | None = None) -> LoadedModel:
    """Load tokenizer and model for ``spec`` (no caching; see :func:`get_model`)."""
    with no_progress_bars():
        return _load(spec, hub)


def quant_method(config) -> str | None:
    """The ``quant_method`` of a config's ``quantization_config`` (a dict or a transformers config object)."""
    quant = getattr(config, "quantization_config", None) or {}
    return quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)


def _load(spec: ModelSpec, hub: HubOptions | None) -> LoadedModel:
    import transformers

    hub = hub or HubOptions.from_env()
    started = time.monotonic()
    # Before the base model, which can take minutes to load: an adapter that will be refused is refused now.
    adapter = adapter_folder(spec.adapter, hub) if spec.adapter else None
    device, dtype = device_and_dtype(spec)
    common = dict(revision=spec.revision, trust_remote_code=spec.trust_remote_code, **hub.kwargs())
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec.model, **common)
    auto_class = getattr(transformers, AUTO_CLASSES[spec.task])
    kwargs = dict(common, dtype=dtype, use_safetensors=True)
    checkpoint_fp8 = None  # how a pre-quantized FP8 checkpoint loads
    quant = quantization_config(spec, device, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
    elif spec.task == "causal-lm":
        # Read once here and handed to from_pretrained, which would read it again.
        kwargs["config"] = transformers.AutoConfig.from_pretrained(spec.model, **common)
        method = quant_method(kwargs["config"])
        if method == "mxfp4":
            # gpt-oss ships its experts in MXFP4: dequantized to the load dtype, so the fast engine runs them
            # (whether or not the worker has the `kernels` package that would keep them MXFP4)
            kwargs["quantization_config"] = transformers.Mxfp4Config(dequantize=True)
        elif method == "fp8":
            kwargs["quantization_config"] = checkpoint_fp8 = fine_grained_fp8(kwargs["config"], spec, device)
    if device.type == "cuda":
        kwargs["device_map"] = "auto"  # straight to the GPU; without it from_pretrained loads on the CPU
    log.info(
        "loading %s %s (revision=%s, dtype=%s, quantization=%s, adapter=%s) on %s",
        spec.task, spec.model, spec.revision, str(dtype).removeprefix("torch."),
        f"{spec.quantization}{' double-quant' if spec.double_quant else ''}" if spec.quantization else None,
        f"{spec.adapter} ({'merged' if spec.merge_adapter else 'not merged'})" if spec.adapter else None, device,
    )
    model = None
    if spec.quantization == "fp8" and not adapter and not spec.trust_remote_code and "config" in kwargs \
            and quant_method(kwargs["config"]) is None:  # a plain checkpoint of a transformers architecture
        from airflow_hfllm.engine import streamed

        quantized = time.monotonic()
        model = streamed.load(auto_class, spec.model, kwargs["config"], common, device, dtype)
        if model is not None:
            log.info("%s: loaded layer by layer into FP8 in %.1f s", spec.model, time.monotonic() - quantized)
    streamed_fp8 = model is not None
    model = model or auto_class.from_pretrained(spec.model, **kwargs)
    if checkpoint_fp8 is not None and checkpoint_fp8.dequantize:
        log.info("%s: FP8 checkpoint dequantized to %s (FP8 is kept for dense models without an adapter on a "
                 "GPU with FP8 matmuls)", spec.model, str(dtype).removeprefix("torch."))
    elif checkpoint_fp8 is not None:
        from airflow_hfllm.engine.fp8 import adopt

        log.info("%s: its %d FP8 linear layers kept in FP8", spec.model, adopt(model))
    if adapter:
        model = attach_adapter(model, spec, adapter)
    if spec.quantization == "fp8" and not streamed_fp8:  # after merging an adapter, into the load-dtype weights
        from airflow_hfllm.engine.fp8 import quantize_model

        quantized = time.monotonic()
        log.info("%s: %d linear layers quantized to FP8 in %.1f s", spec.model, quantize_model(model),
                 time.monotonic() - quantized)
    model.eval()
    model.requires_grad_(False)
    if spec.task == "causal-lm":
        prepare_tokenizer(tokenizer, model)
    seconds = time.monotonic() - started
    log.info("loaded %s in %.1f s", spec.model, seconds)
    return LoadedModel(spec, model, tokenizer, device, dtype, seconds)


def fine_grained_fp8(config, spec: ModelSpec, device):
    """The ``FineGrainedFP8Config`` loading a pre-quantized fine-grained FP8 checkpoint (``quant_method:
    fp8``, e4m3 weights with block scales): kept in FP8 on a GPU with FP8 matmuls, as
    :class:`~airflow_hfllm.engine.fp8.Fp8Linear` (transformers' own ``FP8Linear`` runs a Triton kernel it
    fetches from the hub, which an offline worker cannot); dequantized to the load dtype elsewhere (the
    CPU, older GPUs), for MoE models (their FP8 experts need that kernel too) and under an adapter (LoRA
    merges into load-dtype weights). The checkpoint's own settings (block size, modules left unquantized)
    are kept."""
    import transformers

    from airflow_hfllm.engine.arch.layer import text_config
    from airflow_hfllm.engine.fp8 import capable

    text = text_config(config)
    moe = getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None)
    quant = config.quantization_config
    fp8 = transformers.FineGrainedFP8Config.from_dict(quant if isinstance(quant, dict) else quant.to_dict())
    fp8.dequantize = not capable(device) or bool(moe) or bool(spec.adapter)
    return fp8


def attach_adapter(model, spec: ModelSpec, folder: str):
    """Load ``spec.adapter``, found in ``folder`` (see :func:`adapter_folder`), over ``model`` with PEFT,
    merged into the weights when ``spec.merge_adapter``.

    :raises ValueError: the adapter was trained on another base model (see :func:`same_model`).
    """
    try:
        from peft import PeftConfig, PeftModel
    except ImportError as exc:
        raise ImportError(f"peft_model needs the peft package (pip install peft): {exc}") from exc
    config = PeftConfig.from_pretrained(folder)
    base = config.base_model_name_or_path
    if base and not same_model(base, spec.model):
        raise ValueError(
            f"adapter {spec.adapter} was trained on base model {base!r}, not {spec.model!r}; if {spec.model!r} "
            f"is a copy of that model, set base_model_name_or_path in the adapter's adapter_config.json"
        )
    # A folder with adapter_model.safetensors, never a hub id: given a hub id, PEFT 0.21 falls back to
    # adapter_model.bin (a pickle) whenever the safetensors file is missing, and has no option to forbid it.
    model = PeftModel.from_pretrained(model, folder)
    if spec.merge_adapter:
        model = model.merge_and_unload()
    return model


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def adapter_folder(adapter: str, hub: HubOptions) -> str:
    """The local folder of ``adapter`` (a folder, or a hub id fetched into the HF cache) holding its
    config and ``adapter_model.safetensors``.

    Safetensors only, as for base models (``use_safetensors=True``): ``adapter_model.bin`` is a pickle,
    which can run code as it loads, and torch's ``weights_only`` is then the only guard. From the hub
    only the config and the safetensors file are downloaded, so a ``.bin`` never reaches the machine.

    :raises ValueError: the adapter has no ``adapter_model.safetensors`` (or its folder does not exist).
    """
    if os.path.isdir(adapter):
        folder = adapter
    elif model_identity(adapter)[0] == "path":
        raise ValueError(f"adapter folder {adapter} does not exist")
    else:
        from huggingface_hub import snapshot_download

        # One snapshot for both files: two hf_hub_download calls could straddle a push to the repo.
        folder = snapshot_download(adapter, allow_patterns=["adapter_config.json", ADAPTER_WEIGHTS], **hub.kwargs())
    if not os.path.isfile(os.path.join(folder, ADAPTER_WEIGHTS)):
        pickled = os.path.isfile(os.path.join(folder, "adapter_model.bin"))
        raise ValueError(
            f"adapter {adapter} has no {ADAPTER_WEIGHTS}{' (only adapter_model.bin, a pickle)' if pickled else ''}: "
            f"adapters load from safetensors only, as models do; convert it to safetensors (load it with "
            f"PEFT where you trust it and save_pretrained(..., safe_serialization=True)) and use that copy")
    return folder


_HF_CACHE_SNAPSHOT = re.compile(r"models--([^/]+)/snapshots/[^/]+/?$")


def model_identity(name: str) -> tuple[str, str]:
    """``("hub", "org/name")`` for a hub id or a snapshot folder of the HF cache, else ``("path", realpath)``."""
    snapshot = _HF_CACHE_SNAPSHOT.search(name.replace(os.sep, "/"))
    if snapshot:
        return "hub", snapshot[1].replace("--", "/", 1).lower()
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.path.isdir(name):
        return "path", os.path.realpath(os.path.expanduser(name))
    return "hub", name.lower()


def same_model(trained_on: str, base: str) -> bool:
    """Whether ``base`` is the model an adapter was trained on (``trained_on``, from its config).

    Two hub ids must be equal (case aside; a folder of the HF cache counts as its hub id). A folder and
    a hub id match when the folder is named like the model (``/models/Qwen2-7B`` for ``Qwen/Qwen2-7B``):
    the usual local copy. Two folders must be the same folder; only when the adapter's folder is not on
    this machine (trained elsewhere) is the same folder name enough. Comparing names alone would take
    ``/runs/a/checkpoint-500`` for ``/runs/b/checkpoint-500``, and ``org-a/llama`` for ``org-b/llama``.
    """
    (kind_a, a), (kind_b, b) = model_identity(trained_on), model_identity(base)
    if kind_a == kind_b:
        if a == b:
            return True
        return kind_a == "path" and not os.path.exists(a) and os.path.basename(a) == os.path.basename(b)
    hub_id, folder = (a, b) if kind_a == "hub" else (b, a)
    return os.path.basename(folder).lower() == hub_id.rsplit("/", 1)[-1]


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
