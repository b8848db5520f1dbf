"""Image inputs of vision jobs: manifest cells -> image sources -> checked bytes -> resized RGB images.

A manifest's ``image`` cell is a path or URI string (local path, ``file://``, an object store such as
``s3://``/``gs://``/``az://`` through fsspec, ``data:image/...;base64,``), image bytes (a binary
column, or a Hugging Face ``datasets`` Image struct ``{bytes, path}``), or a list of those for several
images in one row. ``http(s)://`` is fetched only with ``allow_http=True``; every other scheme
(``ftp://``, ``ssh://``, ...) is refused.

Each image goes through two steps:

* :meth:`ImageLoader.probe` (before batching): read the bytes (capped at ``max_bytes``), read the
  header only (``Image.open`` decodes nothing) and check the pixel count against PIL's
  decompression-bomb limit ``Image.MAX_IMAGE_PIXELS`` *before* any pixel is decoded (the limit is not
  changed globally; PIL's ``DecompressionBombWarning`` counts as an error too). The target size comes
  from :func:`smart_resize`, so the number of image tokens is known before batching.
* :meth:`ImageLoader.load` (per batch, in worker threads): decode, convert to RGB, resize.

Resizing follows Qwen2.5-VL's ``qwen_vl_utils.fetch_image``: both sides multiples of ``factor``
(patch size x merge size, 28), pixel count within ``[min_pixels, max_pixels]``, aspect ratio kept,
RGBA composed over white, bicubic ``Image.resize``. Where ``qwen_vl_utils`` imports (GPU workers with
torchvision) it does the conversion and resize; elsewhere (CPU, no torchvision) the PIL code below,
which implements the same semantics, does. Errors name the problem, never the path or the content.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import inspect
import io
import math
import os
import re
import stat
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

DEFAULT_MIN_PIXELS = 224 * 28 * 28
DEFAULT_MAX_PIXELS = 1280 * 28 * 28
DEFAULT_MAX_BYTES = 64 * 2**20
MAX_RATIO = 200  # qwen_vl_utils refuses flatter images
OBJECT_STORE_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oci", "oss", "memory")
HTTP_SCHEMES = ("http", "https")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


class ImageError(ValueError):
    """One image of one row cannot be used; the row gets an ``error``."""


@dataclass(frozen=True)
class ImageSource:
    """Where one image comes from: ``kind`` is ``bytes``, ``data``, ``local``, ``fsspec`` or ``http``."""

    kind: str
    value: Any
    scheme: str = ""


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


# -- resize semantics (qwen_vl_utils.vision_process) ---------------------------------------------
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


# -- manifest cells --------------------------------------------------------------------------------
def parse_source(ref: Any) -> ImageSource:
    """One image reference (string, bytes or ``{bytes, path}`` struct) as an :class:`ImageSource`."""
    if isinstance(ref, (bytes, bytearray, memoryview)):
        if len(ref) == 0:
            raise ImageError("image bytes are empty")
        return ImageSource("bytes", bytes(ref))
    if isinstance(ref, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
        if ref.get("bytes") is not None:
            return parse_source(ref["bytes"])
        if ref.get("path"):
            return parse_source(ref["path"])
        raise ImageError("image struct has neither bytes nor path")
    if not isinstance(ref, str):
        raise ImageError(f"image is a {type(ref).__name__}, expected a path, URI or bytes")
    ref = ref.strip()
    if not ref:
        raise ImageError("image path is empty")
    if ref[:5].lower() == "data:":
        header, sep, payload = ref.partition(",")
        if not sep or not header[5:].lower().startswith("image/") or not header.lower().endswith(";base64"):
            raise ImageError("data URI is not data:image/...;base64,")
        return ImageSource("data", payload, "data")
    match = _SCHEME.match(ref)
    if match is None:
        return ImageSource("local", ref)
    scheme = match.group(1).lower()
    if scheme in ("file", "local"):
        path = ref[match.end():]
        if path.startswith("localhost/"):
            path = path[len("localhost"):]
        return ImageSource("local", path, scheme)
    if scheme in HTTP_SCHEMES:
        return ImageSource("http", ref, scheme)
    return ImageSource("fsspec", ref, scheme)


def parse_cell(cell: Any) -> list[ImageSource]:
    """The image sources of one manifest cell (one reference, or a list of them)."""
    if cell is None:
        raise ImageError("image is null")
    if isinstance(cell, (str, bytes, bytearray, memoryview, dict)):
        return [parse_source(cell)]
    if isinstance(cell, Sequence) or hasattr(cell, "tolist"):
        items = list(cell.tolist() if hasattr(cell, "tolist") else cell)
        if not items:
            raise ImageError("image list is empty")
        sources = []
        for k, item in enumerate(items):
            if item is None:
                raise ImageError(f"image {k + 1} of {len(items)} is null")
            try:
                sources.append(parse_source(item))
            except ImageError as exc:
                raise ImageError(f"image {k + 1} of {len(items)}: {exc}") from None
        return sources
    raise ImageError(f"image is a {type(cell).__name__}, expected a path, URI, bytes or a list of those")


def image_column_error(typ) -> str | None:
    """Why a Parquet column of type ``typ`` cannot hold images, or ``None`` when it can."""
    import pyarrow as pa

    def single(t) -> bool:
        if pa.types.is_struct(t):
            return any(t.field(i).name in ("bytes", "path") for i in range(t.num_fields))
        return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
                or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t) or pa.types.is_null(t))

    if single(typ):
        return None
    if (pa.types.is_list(typ) or pa.types.is_large_list(typ)) and single(typ.value_type):
        return None
    return f"is {typ}, expected a path/URI string, binary image bytes, or a list of those"


# -- reading ---------------------------------------------------------------------------------------
def _http_opener():
    """A urllib opener that follows redirects from http(s) to http(s) only (never to file: or ftp:)."""
    import urllib.request

    class Redirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            match = _SCHEME.match(newurl)
            if match is None or match.group(1).lower() not in HTTP_SCHEMES:
                raise ImageError("http redirect to another scheme refused")
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    return urllib.request.build_opener(Redirects())


class ImageLoader:
    """Fetches, checks and resizes images.

    :param min_pixels: fewest pixels after resizing (``224*28*28`` as the spec).
    :param max_pixels: most pixels after resizing (``1280*28*28``).
    :param factor: both sides of a resized image are multiples of this (patch size x merge size).
    :param allow_http: fetch ``http(s)://`` images (off by default).
    :param fs: fsspec filesystem for URIs of its protocol (e.g. the manifest's object store, with its
        credentials); other object-store URIs go through fsspec with default credentials.
    :param max_bytes: largest encoded image accepted.
    :param backend: ``auto`` (``qwen_vl_utils`` where it imports, else PIL), ``qwen-vl-utils`` or ``pil``.
    :param http_timeout: seconds for one http(s) request.
    """

    def __init__(self, min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS, *,
                 factor: int = 28, allow_http: bool = False, fs=None, max_bytes: int = DEFAULT_MAX_BYTES,
                 backend: str = "auto", http_timeout: float = 30.0):
        if not 0 < min_pixels <= max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels} and {max_pixels}")
        if backend not in ("auto", "qwen-vl-utils", "pil"):
            raise ValueError(f"image backend must be 'auto', 'qwen-vl-utils' or 'pil', got {backend!r}")
        self.min_pixels, self.max_pixels, self.factor = int(min_pixels), int(max_pixels), int(factor)
        self.allow_http = allow_http
        self.fs = fs
        self.max_bytes = max_bytes
        self.http_timeout = http_timeout
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
                "resize": "smart_resize+bicubic", "allow_http": self.allow_http}

    # -- policy and bytes ------------------------------------------------------------------------
    def check(self, source: ImageSource) -> None:
        """Refuse sources this loader may not read (before any I/O)."""
        if source.kind == "http" and not self.allow_http:
            raise ImageError(f"{source.scheme}:// images are not allowed (allow_http_images=False)")
        if source.kind == "fsspec" and source.scheme not in OBJECT_STORE_SCHEMES and not self._fs_handles(source):
            raise ImageError(f"URL scheme {source.scheme!r} is not allowed for images")

    def _fs_handles(self, source: ImageSource) -> bool:
        if self.fs is None:
            return False
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        return source.scheme in protocols

    def read(self, source: ImageSource) -> bytes:
        self.check(source)
        try:
            if source.kind == "bytes":
                data = source.value
            elif source.kind == "data":
                try:
                    data = base64.b64decode(source.value, validate=False)
                except (binascii.Error, ValueError):
                    raise ImageError("data URI holds invalid base64") from None
            elif source.kind == "http":
                data = self._read_http(source.value)
            else:
                data = self._read_fs(source)
        except ImageError:
            raise
        except FileNotFoundError:
            raise ImageError("image not found") from None
        except IsADirectoryError:
            raise ImageError("image path is a directory") from None
        except PermissionError:
            raise ImageError("permission denied reading the image") from None
        except Exception as exc:  # network, credentials, fsspec backends: the type is the message
            raise ImageError(f"cannot read the image ({type(exc).__name__})") from None
        if not data:
            raise ImageError("image is empty (0 bytes)")
        if len(data) > self.max_bytes:
            raise ImageError(f"image is over {self.max_bytes} bytes")
        return data

    def _read_fs(self, source: ImageSource) -> bytes:
        if source.kind == "local":
            return self._read_local(os.path.expanduser(source.value))
        if self._fs_handles(source):
            fs, path = self.fs, self.fs._strip_protocol(source.value)
        else:
            import fsspec.core

            fs, path = fsspec.core.url_to_fs(source.value)
        kind = fs.info(path).get("type")
        if kind == "directory":
            raise IsADirectoryError
        if kind not in ("file", None):
            raise ImageError(f"image path is not a regular file ({kind})")
        with fs.open(path, "rb") as f:
            return f.read(self.max_bytes + 1)

    def _read_local(self, path: str) -> bytes:
        # Non-blocking open, then fstat: a FIFO (or a device) named in the manifest would otherwise
        # block the read forever; checking the path before opening it would race with a swap.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                raise IsADirectoryError
            if not stat.S_ISREG(mode):
                raise ImageError("image path is not a regular file (a FIFO, socket or device)")
            os.set_blocking(fd, True)
            return f.read(self.max_bytes + 1)

    def _read_http(self, url: str) -> bytes:
        import urllib.request

        opener = _http_opener()
        request = urllib.request.Request(url, headers={"User-Agent": "airflow-hfllm"})
        with opener.open(request, timeout=self.http_timeout) as response:
            return response.read(self.max_bytes + 1)

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
        data = self.read(source)
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
