"""Request limits of the HTTP service and product images decoded in memory under them.

Every limit has a safe default and its own clear refusal. An image's pixel count is read from its header by
Pillow's lazy ``Image.open`` and checked *before* any pixel is decoded, so a 1 KB PNG that claims
50,000 × 50,000 pixels is refused without allocating it. Truncated files are always errors.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import sys
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

__all__ = ["DecodeBudget", "ImageRejected", "Limits", "decode_base64", "open_image", "read_image_file"]

DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_WHITE = (255, 255, 255, 255)
_SURROGATE = re.compile("[\ud800-\udfff]")  # a lone UTF-16 surrogate: no file name can hold one


@dataclass(frozen=True)
class Limits:
    """What one request may carry; each limit is refused with its own 4xx."""

    max_body_bytes: int = 64 * 2**20  # whole request body (413)
    max_products: int = 1024  # products in one request (413)
    max_text_chars: int = 20_000  # characters of one product's text (422, field 'text')
    # characters of every other string of a product: id, category, attribute, each label value, each image path (422)
    max_field_chars: int = 1_000
    max_labels: int = 100  # values in one product's label list (422, field 'label')
    max_images_per_product: int = 8  # inline + by path (422, field 'images')
    max_image_bytes: int = 20 * 2**20  # one encoded image file (422)
    max_image_pixels: int = 40_000_000  # width × height of one image, read from its header (422)
    # longer side / shorter side of one image, read from its header (422): a 40,000,000 × 1 image is within the pixel
    # limit but only its middle would reach the model
    max_aspect_ratio: float = 20.0
    formats: tuple[str, ...] = field(default=DEFAULT_FORMATS)  # Pillow format names allowed (422)
    # the model-input tensors of the images the requests in flight have decoded, all requests together: a request
    # that needs more than the whole of it is refused (413), one that does not fit beside the others waits for
    # nothing and is answered 503 with Retry-After
    max_decoded_bytes: int = 2**30
    # seconds a client may take to send a request's headers, counted from the connection (or its previous answer):
    # then the connection is closed after a 408
    header_timeout: float = 10.0
    # seconds a client may take to send a request's body once its headers are in (408, and the connection closed)
    body_timeout: float = 60.0
    # open connections; a request arriving beyond them is answered 503 (uvicorn's limit_concurrency)
    max_connections: int = 512

    def __post_init__(self) -> None:
        for name in (
            "max_body_bytes",
            "max_products",
            "max_text_chars",
            "max_field_chars",
            "max_labels",
            "max_images_per_product",
            "max_image_bytes",
            "max_image_pixels",
            "max_decoded_bytes",
            "max_connections",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"limit {name} must be at least 1, got {getattr(self, name)}")
        if not self.max_aspect_ratio >= 1:  # NaN fails too
            raise ValueError(f"limit max_aspect_ratio must be at least 1, got {self.max_aspect_ratio}")
        for name in ("header_timeout", "body_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"limit {name} must be > 0 seconds, got {getattr(self, name)}")
        object.__setattr__(self, "formats", tuple(f.strip().upper() for f in self.formats if f.strip()))
        if not self.formats:
            raise ValueError("at least one image format must be allowed")
        unknown = sorted(set(self.formats) - set(Image.registered_extensions().values()) - {"JPEG"})
        if unknown:
            raise ValueError(f"unknown image format(s) {unknown}; Pillow names such as {list(DEFAULT_FORMATS)}")


class ImageRejected(ValueError):
    """An image refused by a limit or unreadable; ``reason`` is a short metrics label."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason  # base64 | bytes | path | format | pixels | aspect | corrupt


def _mib(n: int) -> str:
    return f"{n / 2**20:.3g} MiB"


def decode_base64(data: str, limits: Limits) -> bytes:
    """The bytes of an inline image (a ``data:`` URI prefix allowed), refused before decoding when too large."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    if len(data) // 4 * 3 > limits.max_image_bytes + 3:
        raise ImageRejected(
            "bytes", f"image is larger than {_mib(limits.max_image_bytes)} (the limit of one image file)"
        )
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageRejected("base64", f"not a base64 image: {exc}") from None
    if len(raw) > limits.max_image_bytes:
        raise ImageRejected(
            "bytes", f"image is larger than {_mib(limits.max_image_bytes)} (the limit of one image file)"
        )
    return raw


def read_image_file(root: Path, name: str, limits: Limits) -> bytes:
    """The bytes of ``root/name``: the path must stay under ``root`` after resolving symlinks, and be a file."""
    if "\x00" in name or _SURROGATE.search(name):  # neither can be a file name (nor be encoded for the system)
        raise ImageRejected("path", f"{name!r} is not a valid path")
    path = (root / name).resolve()  # follows symlinks: one that leaves the root lands outside it
    if not path.is_relative_to(root):
        raise ImageRejected("path", f"'{name}' is outside the image root")
    if not path.is_file():
        raise ImageRejected("path", f"'{name}' is not a file under the image root")
    size = path.stat().st_size
    if size > limits.max_image_bytes:
        raise ImageRejected(
            "bytes", f"'{name}' is larger than {_mib(limits.max_image_bytes)} (the limit of one image file)"
        )
    with open(path, "rb") as f:
        return f.read(limits.max_image_bytes + 1)


def open_image(raw: bytes, limits: Limits) -> Image.Image:
    """Decode ``raw`` to an upright RGB image (first frame; transparency composited onto white).

    The format, the pixel count and the aspect ratio are checked from the header before decoding; every later step
    (orientation, mode conversion) keeps the pixel count, and the model's resize is bounded by its output
    (:class:`pv2tea.data.dataset.BoundedResize`).

    Raises:
        ImageRejected: not an image, a format not allowed, too many pixels, too elongated, truncated or corrupt.
    """
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                image = Image.open(io.BytesIO(raw))  # lazy: reads the header only
            except Image.DecompressionBombError as exc:
                raise ImageRejected(
                    "pixels",
                    f"image has too many pixels ({exc}); at most {limits.max_image_pixels:,} (--max-image-pixels)",
                ) from None
            except UnidentifiedImageError:
                raise ImageRejected("corrupt", "not an image file (unrecognized format)") from None
            except Exception as exc:  # Pillow signals bad headers with many exception types
                raise ImageRejected("corrupt", f"corrupt image header ({type(exc).__name__}: {exc})") from None
        with image:
            if image.format not in limits.formats:
                raise ImageRejected(
                    "format", f"image format {image.format} is not allowed; allowed: {', '.join(limits.formats)}"
                )
            width, height = image.size
            if width * height > limits.max_image_pixels:
                raise ImageRejected(
                    "pixels",
                    f"image is {width} × {height} = {width * height:,} pixels; at most {limits.max_image_pixels:,} "
                    f"(--max-image-pixels)",
                )
            ratio = max(width, height) / max(1, min(width, height))
            if ratio > limits.max_aspect_ratio:
                raise ImageRejected(
                    "aspect",
                    f"image is {width} × {height}, an aspect ratio of {ratio:,.1f}:1; at most "
                    f"{limits.max_aspect_ratio:g}:1 (--max-aspect-ratio)",
                )
            try:
                image.load()
                upright = ImageOps.exif_transpose(image)
                return _to_rgb(upright)
            except Exception as exc:  # truncated data, bad chunks, unsupported modes
                raise ImageRejected("corrupt", f"image is truncated or corrupt ({type(exc).__name__}: {exc})") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _to_rgb(image: Image.Image) -> Image.Image:
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")


class DecodeBudget:
    """The bytes of decoded images the requests in flight hold, at most ``total`` (thread-safe: requests of any
    event loop share it)."""

    def __init__(self, total: int):
        self.total, self.in_use = total, 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        """Reserve ``n`` bytes; False (nothing reserved) when they do not fit beside those in use."""
        with self._lock:
            if self.in_use + n > self.total:
                return False
            self.in_use += n
            return True

    def give(self, n: int) -> None:
        """Return ``n`` bytes reserved by :meth:`take`."""
        with self._lock:
            self.in_use -= n


# how much lower than the model thread's the image-decoding threads' scheduling priority is (Linux niceness, per
# thread): a request of many large images then decodes in the CPU time the model thread leaves, instead of taking
# half of it on a 2-core machine (`pv2tea bench serve --attack`, docs/results.md)
DECODE_NICENESS = 10


def lower_decode_priority() -> None:
    """Lower the calling thread's scheduling priority by ``DECODE_NICENESS`` (a thread pool's initializer). Where
    threads have no priority of their own (not Linux) or the system refuses, nothing changes."""
    if not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id") or sys.platform != "linux":
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + DECODE_NICENESS))
    except OSError:
        pass


def default_workers() -> int:
    """Image-decoding threads: one per core the process may use."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
