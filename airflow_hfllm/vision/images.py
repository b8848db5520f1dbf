"""Images of vision jobs: :class:`ImageLoader` ties the sources (:mod:`airflow_hfllm.vision.sources`)
to the resize (:mod:`airflow_hfllm.vision.resize`).

Each image goes through two steps:

* :meth:`ImageLoader.probe` (before batching): read the bytes (capped at ``max_bytes``), read the
  header only (``Image.open`` decodes nothing) and check the pixel count against PIL's
  decompression-bomb limit ``Image.MAX_IMAGE_PIXELS`` *before* any pixel is decoded (the limit is not
  changed globally; PIL's ``DecompressionBombWarning`` counts as an error too). The target size comes
  from :func:`~airflow_hfllm.vision.resize.smart_resize`, so the number of image tokens is known before
  batching.
* :meth:`ImageLoader.load` (per batch, in worker threads): decode, convert to RGB, resize.

Errors name the problem, never the path or the content.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from typing import Sequence

from airflow_hfllm.config import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
from airflow_hfllm.vision.resize import pil_resize, qwen_vl_utils_resize, smart_resize
from airflow_hfllm.vision.sources import ImageError, ImageSource, SourceReader


@dataclass
class ProbedImage:
    """An image whose header was read: original and target size, and its (still encoded) bytes."""

    data: bytes
    width: int
    height: int
    target_height: int
    target_width: int
    factor: int

    @property
    def tokens(self) -> int:
        """Tokens this image takes in the language model (one per ``factor`` x ``factor`` cell)."""
        return (self.target_height // self.factor) * (self.target_width // self.factor)


class ImageLoader:
    """Fetches, checks and resizes images.

    :param min_pixels, max_pixels: bounds of the pixel count after resizing
        (:data:`~airflow_hfllm.config.PIXELS_MEAN`).
    :param factor: both sides of a resized image are multiples of this (patch size x merge size: the
        job sets the model's, 28 for Qwen2-VL/Qwen2.5-VL, 32 for Qwen3-VL).
    :param allow_http, fs, max_bytes, http_timeout: where images may come from and how they are read
        (:class:`~airflow_hfllm.vision.sources.SourceReader`).
    :param backend: ``auto`` (``qwen_vl_utils`` where it imports, else PIL), ``qwen-vl-utils`` or ``pil``.
    """

    def __init__(self, min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS, *,
                 factor: int = 28, allow_http: bool = False, fs=None, max_bytes: int = DEFAULT_MAX_BYTES,
                 backend: str = "auto", http_timeout: float = 30.0):
        if not 0 < min_pixels <= max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels} and {max_pixels}")
        if backend not in ("auto", "qwen-vl-utils", "pil"):
            raise ValueError(f"image backend must be 'auto', 'qwen-vl-utils' or 'pil', got {backend!r}")
        self.min_pixels, self.max_pixels, self.factor = int(min_pixels), int(max_pixels), int(factor)
        self.reader = SourceReader(allow_http=allow_http, fs=fs, max_bytes=max_bytes, http_timeout=http_timeout)
        self._qwen, self.backend_reason = (None, "asked for") if backend == "pil" else qwen_vl_utils_resize()
        if backend == "qwen-vl-utils" and self._qwen is None:
            raise RuntimeError(f"image backend 'qwen-vl-utils' asked for, but {self.backend_reason}")
        self.backend = "qwen-vl-utils" if self._qwen is not None else "pil"

    def describe(self) -> str:
        if self.backend == "qwen-vl-utils":
            return "qwen_vl_utils.fetch_image (torchvision available)"
        return f"the PIL implementation of qwen_vl_utils' fetch_image/smart_resize ({self.backend_reason})"

    def fingerprint(self) -> dict:
        """What changes the pixels the model sees (the backend does not: both resize alike)."""
        return {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels, "factor": self.factor,
                "resize": "smart_resize+bicubic", "allow_http": self.reader.allow_http}

    def check(self, source: ImageSource) -> None:
        """Refuse sources this loader may not read (before any I/O)."""
        self.reader.check(source)

    # -- header, decode, resize ------------------------------------------------------------------
    def _open(self, data: bytes, probing: bool = True):
        """``Image.open`` on the bytes: header only, pixel count checked before anything is decoded.

        When ``probing`` (in the job's thread), PIL's ``DecompressionBombWarning`` is raised as an error;
        the decode threads skip that (``warnings.catch_warnings`` is not thread-safe), and their images
        have passed the size check already.
        """
        from PIL import Image, UnidentifiedImageError

        with warnings.catch_warnings() if probing else contextlib.nullcontext():
            if probing:  # PIL warns above MAX_IMAGE_PIXELS and raises above twice that: both are errors here
                warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                image = Image.open(io.BytesIO(data))
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise ImageError(f"image is over PIL's decompression-bomb limit ({exc.__class__.__name__}: "
                                 f"Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS})") from None
            except UnidentifiedImageError:
                raise ImageError("not an image (unrecognised format)") from None
            except Exception as exc:
                raise ImageError(f"unreadable image header ({type(exc).__name__}: {exc})") from None
        width, height = image.size
        limit = Image.MAX_IMAGE_PIXELS
        if limit and width * height > limit:  # what PIL would warn about; checked here in any case
            raise ImageError(f"image has {width * height} pixels, over PIL's decompression-bomb limit "
                             f"(Image.MAX_IMAGE_PIXELS={limit})")
        return image

    def probe(self, source: ImageSource) -> ProbedImage:
        data = self.reader.read(source)
        image = self._open(data)
        width, height = image.size
        image.close()
        target_h, target_w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        return ProbedImage(data, width, height, target_h, target_w, self.factor)

    def load(self, probed: ProbedImage):
        """Decode and resize (thread-safe); :class:`ImageError` for corrupt or truncated data."""
        image = self._open(probed.data, probing=False)
        try:
            image.load()  # truncated data raises (PIL's ImageFile.LOAD_TRUNCATED_IMAGES is off)
        except Exception as exc:
            raise ImageError(f"corrupt image data ({type(exc).__name__}: {str(exc)[:200]})") from None
        if image.size != (probed.width, probed.height):
            raise ImageError("image size changed while decoding")
        if self._qwen is None:
            return pil_resize(image, probed.target_height, probed.target_width)
        out = self._qwen(image, self.min_pixels, self.max_pixels, self.factor)
        if out.size != (probed.target_width, probed.target_height):  # another qwen_vl_utils arithmetic
            raise ImageError(f"qwen_vl_utils resized to {out.size[0]}x{out.size[1]}, expected "
                             f"{probed.target_width}x{probed.target_height}")
        return out


def decode_images(loader: ImageLoader, images: Sequence[ProbedImage]) -> list | str:
    """The row's decoded, resized images, or the error message of the first that fails."""
    out = []
    for k, probed in enumerate(images):
        try:
            out.append(loader.load(probed))
        except ImageError as exc:
            return f"image {k + 1} of {len(images)}: {exc}" if len(images) > 1 else str(exc)
    return out
