"""Image sources of vision jobs: manifest cells -> :class:`ImageSource` -> checked bytes.

A manifest's ``image`` cell is a path or URI string (local path, ``file://``, an object store such as
``s3://``/``gs://``/``az://`` through fsspec, ``data:image/...;base64,``), image bytes (a binary
column, or a Hugging Face ``datasets`` Image struct ``{bytes, path}``), or a list of those for several
images in one row. ``http(s)://`` is fetched only with ``allow_http=True``; every other scheme
(``ftp://``, ``ssh://``, ...) is refused. :class:`SourceReader` applies that policy before any I/O and
reads the bytes, capped at ``max_bytes``. Errors name the problem, never the path or the content.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
from dataclasses import dataclass
from typing import Any, Sequence

from airflow_hfllm.config import DEFAULT_MAX_BYTES

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


class SourceReader:
    """Checks image sources against the scheme policy and reads their bytes.

    :param allow_http: fetch ``http(s)://`` images (off by default).
    :param fs: fsspec filesystem for URIs of its protocol (e.g. the manifest's object store, with its
        credentials); other object-store URIs go through fsspec with default credentials.
    :param max_bytes: largest encoded image accepted.
    :param http_timeout: seconds for one http(s) request.
    """

    def __init__(self, *, allow_http: bool = False, fs=None, max_bytes: int = DEFAULT_MAX_BYTES,
                 http_timeout: float = 30.0):
        self.allow_http = allow_http
        self.fs = fs
        self.max_bytes = max_bytes
        self.http_timeout = http_timeout

    def check(self, source: ImageSource) -> None:
        """Refuse sources this reader may not read (before any I/O)."""
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
