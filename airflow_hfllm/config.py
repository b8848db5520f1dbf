"""What to load and how to generate: plain, hashable values with no heavy imports."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

QUANTIZATIONS = (None, "8bit", "4bit")
DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class ModelSpec:
    """Identity of a loaded model: the model cache key.

    :param model: hub id or local folder.
    :param revision: hub revision (branch, tag or commit).
    :param dtype: ``auto`` means bf16 on GPU and fp32 on CPU; quantized, fp16 for 8-bit and bf16 for 4-bit
        (see :func:`airflow_hfllm.engine.loading.device_and_dtype`).
    :param quantization: ``None``, ``"8bit"`` or ``"4bit"`` (bitsandbytes; 4-bit is nf4). ``True`` means
        8-bit, as in the spec.
    :param double_quant: 4-bit only: also quantize the quantization constants (saves ~0.4 bit per
        weight). ``None`` means on. Part of the key: it changes the weights.
    :param adapter: PEFT adapter (hub id or folder) loaded over the model.
    :param merge_adapter: merge the adapter into the weights (merged weights generate faster, and the
        fast engine can run them). Ignored, and set to ``False``, when quantized.
    :param trust_remote_code: run code shipped with the model; off unless asked.
    :param task: ``causal-lm``, ``seq2seq``, ``classifier`` or ``vision``: the Auto class to load with.
    """

    model: str
    revision: str | None = None
    dtype: str = "auto"
    quantization: str | None = None
    double_quant: bool | None = None
    adapter: str | None = None
    merge_adapter: bool = True
    trust_remote_code: bool = False
    task: str = "causal-lm"

    def __post_init__(self):
        quantization = normalize_quantization(self.quantization)
        object.__setattr__(self, "quantization", quantization)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        object.__setattr__(self, "adapter", self.adapter or None)
        # Options that change nothing are set to one value, so that equal models get one cache key.
        object.__setattr__(self, "double_quant", (self.double_quant is not False) if quantization == "4bit" else None)
        if not self.adapter:
            object.__setattr__(self, "merge_adapter", True)
        elif quantization:
            # Merging LoRA weights into bitsandbytes weights would re-quantize them (and lose precision).
            object.__setattr__(self, "merge_adapter", False)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def normalize_quantization(value) -> str | None:
    """The spec's ``quantization=True`` meant 8-bit; accept it, plus ``"8bit"``/``"4bit"``."""
    if value in (None, False, "", "none"):
        return None
    if value is True:
        return "8bit"
    text = str(value).lower().replace("-", "")
    if text in ("8bit", "int8"):
        return "8bit"
    if text in ("4bit", "nf4", "int4"):
        return "4bit"
    raise ValueError(f"quantization must be one of none, 8bit, 4bit (or True for 8bit), got {value!r}")


@dataclass(frozen=True)
class GenerationParams:
    """The spec's generation parameters, with the spec's defaults.

    ``min_length`` counts new tokens (the spec passed it to ``generate()``, where it also counted the
    prompt and so depended on padding). ``length_penalty`` only matters with beam search.
    """

    max_new_tokens: int = 1024
    do_sample: bool = True
    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_length: int | None = None
    use_cache: bool = True
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    length_penalty: float = 1.0
    num_beams: int = 1

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError("temperature must be > 0 when sampling; use do_sample=False for greedy")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be between -2 and 2, got {getattr(self, name)}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stop"] = list(self.stop)
        return d

    def replace(self, **changes) -> "GenerationParams":
        return dataclasses.replace(self, **changes)


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
