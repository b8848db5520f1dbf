"""The vision model and its processor, through the shared model cache.

The model is an ordinary :class:`~airflow_hfllm.config.ModelSpec` with ``task="vision"``
(``AutoModelForImageTextToText``), so it is cached and evicted like every other model. The processor
is cached next to it, keyed by the model alone: its options (``min_pixels``/``max_pixels``) are not part
of the model's identity, they are passed on every call (and are part of the job fingerprint).

``AutoProcessor`` needs the video processor, which needs torchvision; without it (CPU here) it raises,
or in some versions silently returns only the tokenizer. Both are detected, and the processor is then
built from its parts (image processor + tokenizer), which is all image rows need.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from airflow_hfllm.engine.cache import MODEL_CACHE, ModelCache
from airflow_hfllm.config import HubOptions
from airflow_hfllm.engine.loading import LoadedModel, get_model, prepare_tokenizer
from airflow_hfllm.config import ModelSpec

log = logging.getLogger(__name__)

VISION_TASK = "vision"


def vision_spec(spec: ModelSpec) -> ModelSpec:
    """``spec`` with ``task="vision"``."""
    return spec if spec.task == VISION_TASK else dataclasses.replace(spec, task=VISION_TASK)


@dataclass
class LoadedProcessor:
    processor: Any
    how: str  # "AutoProcessor" or "built from image processor + tokenizer (...why...)"

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def image_processor(self):
        return self.processor.image_processor

    @property
    def factor(self) -> int:
        """Side of one language-model image token in pixels: the image processor's patch size x merge size,
        as saved with the model (28 for Qwen2-VL/Qwen2.5-VL, 32 for Qwen3-VL's 16-pixel patches)."""
        ip = self.image_processor
        patch = getattr(ip, "patch_size", None) or 14
        merge = getattr(ip, "merge_size", None) or 2
        return int(patch) * int(merge)

    @property
    def image_token_id(self) -> int:
        token_id = getattr(self.processor, "image_token_id", None)
        if token_id is None:
            token_id = self.tokenizer.convert_tokens_to_ids(getattr(self.processor, "image_token", "<|image_pad|>"))
        return int(token_id)


def _has_image_processor(processor) -> bool:
    return getattr(processor, "image_processor", None) is not None and getattr(processor, "tokenizer", None) is not None


def load_processor(spec: ModelSpec, hub: HubOptions | None = None) -> LoadedProcessor:
    """``AutoProcessor`` for ``spec``, or, where that cannot give an image processor, the processor
    class built from its image processor and tokenizer. Fails with the reason when neither works."""
    import transformers

    hub = hub or HubOptions.from_env()
    common = dict(revision=spec.revision, trust_remote_code=spec.trust_remote_code, **hub.kwargs())
    try:
        processor = transformers.AutoProcessor.from_pretrained(spec.model, **common)
    except Exception as exc:  # ImportError for the video processor without torchvision, and others
        why = f"AutoProcessor failed: {type(exc).__name__}: {str(exc).strip().split('. ')[0][:200]}"
    else:
        if _has_image_processor(processor):
            loaded = LoadedProcessor(processor, "AutoProcessor")
            _left_padding(loaded)
            return loaded
        why = f"AutoProcessor returned a {type(processor).__name__} without an image processor"
    log.warning("processor for %s: %s; building it from the image processor and the tokenizer", spec.model, why)
    try:
        processor = _processor_from_parts(spec, common)
    except Exception as exc:
        raise RuntimeError(f"cannot build an image processor for {spec.model}: {why}; from its parts: "
                           f"{type(exc).__name__}: {exc}") from exc
    loaded = LoadedProcessor(processor, f"built from image processor + tokenizer ({why})")
    _left_padding(loaded)
    return loaded


def _processor_from_parts(spec: ModelSpec, common: dict):
    """The model's processor class with only its image processor and tokenizer (no video processor).

    ``ProcessorMixin`` derives the sub-processors it requires from ``__init__``'s parameters, so a
    subclass whose ``__init__`` names only ``image_processor`` and ``tokenizer`` keeps every image and
    text method (image-token expansion, ``mm_token_type_ids``) without asking for a video processor.
    """
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    config = transformers.AutoConfig.from_pretrained(spec.model, **common)
    name = PROCESSOR_MAPPING_NAMES.get(config.model_type)
    if not name:
        raise ValueError(f"no processor class is known for model type {config.model_type!r}")
    image_processor = transformers.AutoImageProcessor.from_pretrained(spec.model, **common)
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec.model, **common)
    return images_only_processor(getattr(transformers, name), image_processor, tokenizer,
                                 getattr(tokenizer, "chat_template", None))


def images_only_processor(processor_class, image_processor, tokenizer, chat_template=None):
    """An instance of (a subclass of) ``processor_class`` holding only an image processor and a tokenizer."""

    class ImagesOnly(processor_class):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
                             **kwargs)

    ImagesOnly.__name__ = ImagesOnly.__qualname__ = f"{processor_class.__name__}ImagesOnly"
    return ImagesOnly(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


def _left_padding(processor: LoadedProcessor) -> None:
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token_id = tokenizer.eos_token_id


def get_processor(spec: ModelSpec, hub: HubOptions | None = None, cache: ModelCache = MODEL_CACHE
                  ) -> LoadedProcessor:
    """The processor of ``spec``'s model from the process cache (keyed by model, revision and
    trust_remote_code only: processor options are passed per call)."""
    key = ("processor", spec.model, spec.revision, spec.trust_remote_code)
    return cache.get(key, lambda: load_processor(spec, hub))


def get_vision_model(spec: ModelSpec, hub: HubOptions | None = None, cache: ModelCache = MODEL_CACHE
                     ) -> LoadedModel:
    """``spec``'s model (task ``vision``) from the shared model cache, ready for left-padded batches."""
    loaded = get_model(vision_spec(spec), hub, cache)
    prepare_tokenizer(loaded.tokenizer, loaded.model)
    return loaded
