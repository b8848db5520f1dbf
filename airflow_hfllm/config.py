"""Every parameter of a job, written once: its default, its check, its help, and how the operators
(``base_model``) and the CLI (``--model``) spell it where that differs from its name.

Plain values with no heavy imports: DAG parsing builds the operators' signatures from here. An
interface reads :func:`airflow_hfllm.options.options` and wires every field in one loop, so a new parameter
is one field (:func:`airflow_hfllm.options.option`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from airflow_hfllm.options import check, option

QUANTIZATIONS = (None, "8bit", "4bit", "fp8")
BITSANDBYTES = ("8bit", "4bit")
DTYPES = ("auto", "bfloat16", "float16", "float32")
DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS = 224 * 28 * 28, 1280 * 28 * 28  # the spec's
DEFAULT_MAX_BYTES = 64 * 2**20
# What min_pixels and max_pixels mean, for every vision model (in transformers 5 they are the image
# processor's size {"shortest_edge": min_pixels, "longest_edge": max_pixels}).
PIXELS_MEAN = ("Counted on the resized image, whose sides are multiples of the patch size x 2 (its 2x2 merge): "
               "28 for Qwen2-VL/Qwen2.5-VL (14-pixel patches), 32 for Qwen3-VL (16-pixel patches), each such square "
               "one image token; the default bounds are 224..1280 image tokens for Qwen2.5-VL, ~172..980 for Qwen3-VL")

@dataclass(frozen=True)
class ModelSpec:
    """Identity of a loaded model: the model cache key. ``task`` is the Auto class to load with
    (``causal-lm``, ``seq2seq``, ``classifier`` or ``vision``). Options that change nothing are set to
    one value, so that equal models get one key: ``double_quant`` is ``None`` unless 4-bit, an adapter over
    bitsandbytes weights is never merged (merging LoRA into them would re-quantize them), and one under FP8
    always is (into the load-dtype weights, before they are quantized: LoRA cannot wrap an FP8 layer)."""

    model: str = option(help="hub id or local folder of the model", cli="--model", operator="base_model",
                        templated=True)
    revision: str | None = option(None, "model revision: branch, tag or commit", templated=True)
    dtype: str = option("auto", "auto: bfloat16 on a GPU (float16 where unsupported, and for 8bit), float32 on "
                                "the CPU", choices=DTYPES)
    quantization: str | None = option(None, "bitsandbytes: 8bit or 4bit (nf4), True means 8bit as in the spec; fp8: "
                                            "the decoder's linear layers in FP8 e4m3 with per-channel scales, on "
                                            "the fast engine (GPUs of compute capability 8.9+: Ada, Hopper)",
                                      choices=QUANTIZATIONS)
    double_quant: bool | None = option(True, "4bit: also quantize the quantization constants (~0.4 bit less "
                                             "per weight)", kinds=("text",))
    adapter: str | None = option(None, "PEFT adapter (hub id or folder) loaded over the model",
                                 cli="--peft-model", operator="peft_model", templated=True, kinds=("text",))
    merge_adapter: bool = option(True, "merge the adapter into the weights (faster; never when quantized)",
                                 kinds=("text",))
    trust_remote_code: bool = option(False, "run code shipped with the model")
    task: str = "causal-lm"

    def __post_init__(self):
        quantization = normalize_quantization(self.quantization)
        object.__setattr__(self, "quantization", quantization)
        check(self)
        object.__setattr__(self, "adapter", self.adapter or None)
        object.__setattr__(self, "double_quant", (self.double_quant is not False) if quantization == "4bit" else None)
        if not self.adapter:
            object.__setattr__(self, "merge_adapter", True)
        elif quantization:
            object.__setattr__(self, "merge_adapter", quantization not in BITSANDBYTES)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def normalize_quantization(value) -> str | None:
    """The spec's ``quantization=True`` meant 8-bit; accept it, plus ``"8bit"``/``"4bit"``/``"fp8"``."""
    if value in (None, False, "", "none"):
        return None
    if value is True:
        return "8bit"
    text = str(value).lower().replace("-", "")
    if text in ("8bit", "int8"):
        return "8bit"
    if text in ("4bit", "nf4", "int4"):
        return "4bit"
    if text in ("fp8", "float8", "e4m3"):
        return "fp8"
    raise ValueError(f"quantization must be one of none, 8bit, 4bit, fp8 (or True for 8bit), got {value!r}")


@dataclass(frozen=True)
class GenerationParams:
    """The spec's generation parameters, with the spec's defaults.

    ``min_length`` counts new tokens (the spec passed it to ``generate()``, where it also counted the
    prompt and so depended on padding). ``length_penalty`` only matters with beam search.
    """

    max_new_tokens: int = option(1024, "tokens to generate per row (a max_new_tokens column overrides it per "
                                       "row)", templated=True, minimum=1)
    # the spec's image model was greedy
    do_sample: bool = option(True, "sample (off: greedy decoding)", cli="--sample", per_kind={"vision": False})
    temperature: float = option(0.6, "sampling temperature", templated=True)
    top_p: float = option(0.9, "nucleus sampling mass, in (0, 1]")
    top_k: int = option(50, "top-k sampling (0: off)", minimum=0)
    repetition_penalty: float = option(1.0, "divides the logits of tokens in the prompt or output so far "
                                            "(1.0: none)", minimum=0)
    presence_penalty: float = option(0.0, "subtracted from the logits of tokens the output already holds "
                                          "(OpenAI's)", minimum=-2, maximum=2, since=2)
    frequency_penalty: float = option(0.0, "subtracted from a token's logit once per time the output already "
                                           "holds it (OpenAI's)", minimum=-2, maximum=2, since=2)
    num_return_sequences: int = option(1, "samples per prompt: one output row each, with a 'sample' column from 0 "
                                          "(id and sample together unique); needs sampling", minimum=1, since=2)
    logprobs: int | None = option(
        None, "K: add columns 'output_logprob' (the summed log-probability of the output's tokens) and "
              "'top_logprobs' (per token: its id, text and log-probability, and the K likeliest tokens at its step); "
              "the model's raw log-softmax, before penalties, temperature, top-k and top-p (0: no alternatives); "
              "with choices, also 'choice_logprobs': each choice's total log-probability after the prompt",
        minimum=0, maximum=20, kinds=("text",), metavar="K", since=2)
    min_length: int | None = option(None, "minimum new tokens", minimum=0)
    use_cache: bool = option(True, "KV cache during generation (batched generate() only)", cli="")
    seed: int | None = option(None, "sampling seed (none: one is drawn, kept in the output folder and reused by "
                                    "retries)")
    stop: tuple[str, ...] = option((), "stop string (repeatable)")
    json_schema: dict | str | None = option(
        None, "outputs are JSON matching this schema: a dict, JSON text, or a path or URL of a JSON file (the "
              "schema itself is part of the fingerprint)", kinds=("text",), metavar="FILE", since=2)
    regex: str | None = option(None, "outputs match this regular expression (whole output; Rust regex syntax)",
                               kinds=("text",), since=2)
    choices: str | tuple[str, ...] | None = option(
        None, "outputs are exactly one of these strings: a list, or a,b,c on the CLI", kinds=("text",),
        metavar="A,B,C", since=2)
    length_penalty: float = option(1.0, "beam search only", cli="")
    num_beams: int = 1

    @property
    def scores_choices(self) -> bool:  # rows get choice_logprobs: choices with logprobs (engine/choices.py)
        return bool(self.choices) and self.logprobs is not None

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        check(self)
        if (self.json_schema, self.regex, self.choices) != (None, None, None):  # read, checked and compiled now
            from airflow_hfllm.engine.grammar import checked

            for name, value in checked(self.json_schema, self.regex, self.choices).items():
                object.__setattr__(self, name, value)
        if self.do_sample and self.temperature <= 0:
            raise ValueError("temperature must be > 0 when sampling; use do_sample=False for greedy")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.num_return_sequences > 1 and not self.do_sample:
            raise ValueError("num_return_sequences > 1 needs do_sample=True: greedy samples would all be the same")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stop"] = list(self.stop)
        d["choices"] = None if self.choices is None else list(self.choices)
        return d

    def replace(self, **changes) -> "GenerationParams":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class JobConfig:
    """How a job reads its rows, batches them, checks them and writes them (the kinds share these)."""

    id_column: str = option("id", "unique join key column")
    prompt_column: str | None = option("prompt", "prompt string column")
    messages_column: str | None = option(None, "chat messages column (list of {role, content}), instead of the "
                                               "prompt column", kinds=("text",))
    max_new_tokens_column: str = option("max_new_tokens", "column of per-row max new tokens (null: the job's)")
    system_prompt: str | None = option(None, "system message for every row without one of its own", templated=True)
    prompt_template: str | None = option(
        None, 'Jinja building each row\'s prompt from the row as ``row`` ("Summarise: {{ row.text }}") and, under '
              "Airflow, the task's context ({{ ds }}); the values it reads are part of the fingerprint",
        templated=True)
    keep_columns: tuple[str, ...] = option((), "input column copied to the output (repeatable)", cli="--keep-column")
    # vision rows are heavier: smaller parts
    chunk_rows: int = option(1000, "rows per input chunk and output part (the unit of resume)", minimum=1,
                             per_kind={"vision": 256})
    batch_size: int | None = option(None, "cap on rows per batch (none: a token budget decides)", minimum=1)
    token_budget: int | None = option(None, "batched generate(): padded tokens per batch (none: from free memory)",
                                      minimum=1)
    max_prompt_tokens: int | None = option(
        None, "longest prompt accepted; longer rows get an error (none: the model's context minus the row's max new "
              "tokens)", operator="max_padding_length", minimum=1)
    safety_checkers: tuple[Any, ...] = option(
        (), "safety checker on prompt and output text: salesforce:MODEL, classifier:MODEL, llama-guard:MODEL or "
            "blocklist:FILE (the operators also take dicts and SafetyChecker objects)",
        cli="--safety", metavar="KIND:MODEL", templated=True)
    on_unsafe_output: str = option("redact", "redact: an unsafe output is written as null; keep: written, flagged",
                                   choices=("redact", "keep"))
    max_error_rate: float = option(0.05, "fail (after writing everything) when more than this share of rows "
                                         "ended in error", minimum=0, maximum=1)
    engine: str = option("auto", "auto: the fast engine on a GPU when the model allows (continuous batching, "
                                 "CUDA graphs), else batched generate()", choices=("auto", "fast", "batched"))
    compile: str = option("auto", "torch.compile the fast engine's layers: auto (a GPU text job of at least 2M output "
                                  "tokens, which repays the compiling), on, off", choices=("auto", "on", "off"))
    kv_cache_dtype: str = option("auto", "the fast engine's KV cache: auto (the model's dtype) or fp8 (e4m3: half the "
                                         "memory and reads; GPUs of capability 8.9+)", choices=("auto", "fp8"), since=2)
    input_fingerprint: str = option(
        "metadata", "how a changed input is noticed: metadata (size and etag/mtime) or content (a SHA-256 of every "
                    "input file, read each run: for files rewritten with size and mtime kept)",
        choices=("metadata", "content"))
    replace_foreign_files: bool = option(False, "delete files in the output folder this package did not write "
                                                "(off: such a folder is refused)")
    progress_every: float = option(5.0, "seconds between progress lines", minimum=0)
    chat_template_kwargs: dict | None = option(
        None, 'arguments for the model\'s chat template, as JSON on the CLI: {"enable_thinking": false} (Qwen3), '
              '{"reasoning_effort": "low"} (gpt-oss)', kinds=("text",), metavar="JSON", since=2)
    reasoning: bool = option(False, "move what the model wrote in its <think> block into a 'reasoning' column, out "
                                    "of 'output' and out of the output check's answer (checked as its own text)",
                             kinds=("text",), since=2)

    def __post_init__(self):
        kwargs = self.chat_template_kwargs
        if isinstance(kwargs, str):
            try:
                kwargs = json.loads(kwargs) if kwargs.strip() else None
            except json.JSONDecodeError as exc:
                raise ValueError(f"chat_template_kwargs is not JSON: {exc}") from None
        if kwargs is not None and not isinstance(kwargs, dict):
            raise ValueError(f"chat_template_kwargs must be a JSON object, got {kwargs!r}")
        object.__setattr__(self, "chat_template_kwargs", kwargs or None)
        object.__setattr__(self, "keep_columns", tuple(self.keep_columns or ()))
        checkers = self.safety_checkers
        object.__setattr__(self, "safety_checkers", (checkers,) if isinstance(checkers, (str, dict))
                           else tuple(checkers or ()))
        check(self)
        if len(set(self.keep_columns)) != len(self.keep_columns):
            raise ValueError(f"keep columns named more than once: {list(self.keep_columns)}")


@dataclass(frozen=True)
class VisionOptions:
    """How a vision job reads and resizes its images (Qwen2-VL / Qwen2.5-VL / Qwen3-VL)."""

    image_column: str = option("image", "image column: a path or URI (local, file://, s3://..., "
                                        "data:image/...;base64,), image bytes, or a list of those", kinds=("vision",))
    min_pixels: int = option(DEFAULT_MIN_PIXELS, f"fewest pixels of a resized image (the spec's 224*28*28). "
                                                 f"{PIXELS_MEAN}", templated=True, kinds=("vision",), minimum=1)
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "most pixels of a resized image (the spec's 1280*28*28), counted "
                                                 "as min_pixels", templated=True, kinds=("vision",), minimum=1)
    allow_http_images: bool = option(False, "fetch http(s):// images (off: such rows get an error)",
                                     kinds=("vision",))
    max_image_bytes: int = option(DEFAULT_MAX_BYTES, "largest encoded image accepted", kinds=("vision",), minimum=1)
    image_backend: str = option("auto", "auto: qwen_vl_utils where it imports (needs torchvision), else the PIL "
                                        "implementation of the same resize", choices=("auto", "qwen-vl-utils", "pil"),
                                kinds=("vision",))

    def __post_init__(self):
        check(self)  # min_pixels <= max_pixels: ImageLoader's, which also serves the processor's own bounds


@dataclass(frozen=True)
class HubOptions:
    """Where and how to reach the hub. Not part of the cache key; the token is never logged.

    :param cache_dir: on-disk HF cache (defaults to ``HF_HOME``/``HF_HUB_CACHE``); may be a volume
        shared by all GPU workers.
    :param token: hub token for gated models.
    :param local_files_only: never touch the network (air-gapped workers).
    """

    cache_dir: str | None = option(None, "HF cache folder (none: HFLLM_CACHE_DIR, else HF_HOME)", operator="")
    token: str | None = field(default=None, repr=False)
    local_files_only: bool = option(False, "never reach the hub (also when HF_HUB_OFFLINE=1)", operator="")

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


# What the operators and the CLI build, in this order.
CONFIGS = (ModelSpec, GenerationParams, JobConfig, VisionOptions, HubOptions)
