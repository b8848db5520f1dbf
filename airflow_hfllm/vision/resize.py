"""Resizing of vision jobs' images as Qwen2.5-VL's ``qwen_vl_utils.fetch_image`` does: both sides
multiples of ``factor`` (patch size x merge size: 28 for Qwen2-VL/Qwen2.5-VL, 32 for Qwen3-VL, the
model's image processor's), pixel count within ``[min_pixels, max_pixels]``, aspect ratio kept
(:func:`smart_resize`), RGBA composed over white, bicubic ``Image.resize``.

Where ``qwen_vl_utils`` imports (GPU workers with torchvision) it does the conversion and resize
(:func:`qwen_vl_utils_resize`); elsewhere (CPU, no torchvision) :func:`pil_resize`, which implements the
same semantics, does.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

from airflow_hfllm.config import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
from airflow_hfllm.vision.sources import ImageError

MAX_RATIO = 200  # qwen_vl_utils refuses flatter images


def round_by_factor(number: float, factor: int) -> int:
    return round(number / factor) * factor


def ceil_by_factor(number: float, factor: int) -> int:
    return math.ceil(number / factor) * factor


def floor_by_factor(number: float, factor: int) -> int:
    return math.floor(number / factor) * factor


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """``(height, width)`` with both sides multiples of ``factor``, ``height * width`` within
    ``[min_pixels, max_pixels]`` and the aspect ratio kept as well as possible: the same arithmetic as
    ``qwen_vl_utils.smart_resize``. Raises :class:`ImageError` for images too flat to resize."""
    if max_pixels < min_pixels:
        raise ValueError(f"max_pixels ({max_pixels}) must be >= min_pixels ({min_pixels})")
    if min(height, width) < 1:
        raise ImageError(f"image is {width}x{height} pixels")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ImageError(f"aspect ratio {max(height, width) / min(height, width):.0f} is over {MAX_RATIO}")
    h_bar = max(factor, round_by_factor(height, factor))
    w_bar = max(factor, round_by_factor(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = floor_by_factor(height / beta, factor)
        w_bar = floor_by_factor(width / beta, factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = ceil_by_factor(height * beta, factor)
        w_bar = ceil_by_factor(width * beta, factor)
    if h_bar < factor or w_bar < factor:
        raise ImageError(f"a {width}x{height} image cannot be resized within max_pixels={max_pixels}")
    return h_bar, w_bar


def to_rgb(image):
    """RGBA is composed over white (as ``qwen_vl_utils.to_rgb``); every other mode is converted."""
    from PIL import Image

    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[3])
        return background
    return image.convert("RGB")


def pil_resize(image, height: int, width: int):
    """The PIL path: what ``qwen_vl_utils.fetch_image`` does to a ``PIL.Image`` input."""
    return to_rgb(image).resize((width, height))  # PIL's default filter for RGB: bicubic


def qwen_vl_utils_resize() -> tuple[Callable | None, str]:
    """``(resize, why)``: a resize through ``qwen_vl_utils.fetch_image`` where it imports (it imports
    torchvision at module top), else ``(None, the reason)``."""
    try:
        import qwen_vl_utils
    except Exception as exc:  # ImportError, or torchvision failing to load its CUDA libraries
        return None, f"qwen_vl_utils does not import: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    fetch = qwen_vl_utils.fetch_image
    params = inspect.signature(fetch).parameters

    def resize(image, min_pixels: int, max_pixels: int, factor: int):
        ele = {"image": image, "min_pixels": min_pixels, "max_pixels": max_pixels}
        if "image_patch_size" in params:  # qwen-vl-utils >= 0.0.12: factor = patch size x merge size 2
            return fetch(ele, image_patch_size=factor // 2)
        if "size_factor" in params:
            return fetch(ele, size_factor=factor)
        return fetch(ele)

    return resize, "qwen_vl_utils.fetch_image"
