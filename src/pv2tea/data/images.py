"""Image checking and loading for PV2TEA product images (ACL Findings 2023, §3 visual encoding).

``check_image`` tells whether a product image can be decoded in full (it catches missing
files, non-images, corrupt and truncated files); ``load_rgb`` decodes one to RGB.
Truncated files are always treated as errors, whatever PIL's global
``ImageFile.LOAD_TRUNCATED_IMAGES`` says elsewhere in the process.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from os import PathLike
from pathlib import Path
from typing import IO

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

__all__ = ["ImageLoadError", "check_image", "load_rgb"]

# Background that transparent pixels are composited onto.
_WHITE = (255, 255, 255, 255)


class ImageLoadError(OSError):
    """An image file that cannot be decoded; the message names the path."""


@contextmanager
def _truncated_images_rejected() -> Iterator[None]:
    """Make PIL raise on truncated files for the duration of the block."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def check_image(path: str | PathLike[str]) -> str | None:
    """Return ``None`` if ``path`` is a fully decodable image, else the reason it is not.

    The reason reads as a predicate of the image, e.g. ``"does not exist"`` or
    ``"is truncated or corrupt (OSError: image file is truncated)"``.
    """
    file = Path(path)
    try:
        if not file.exists():
            return "does not exist"
        if not file.is_file():
            return "is not a regular file"
    except (OSError, ValueError) as exc:  # a name too long for the file system, a NUL byte
        return f"cannot be looked up ({type(exc).__name__}: {getattr(exc, 'strerror', None) or exc})"
    with _truncated_images_rejected():
        try:
            with Image.open(file) as image:
                image.verify()
            # verify() leaves the image unusable and skips pixel data; decode it for real.
            with Image.open(file) as image:
                image.load()
        except UnidentifiedImageError:
            return "is not an image file (unrecognized format)"
        except Exception as exc:  # PIL signals bad data with many exception types
            return f"is truncated or corrupt ({type(exc).__name__}: {exc})"
    return None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert to RGB, compositing any transparency onto white."""
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")


def load_rgb(path: str | PathLike[str] | IO[bytes]) -> Image.Image:
    """Decode ``path`` (or the bytes of an open binary file) as an upright RGB image (EXIF orientation applied).

    Raises:
        ImageLoadError: if the file is missing, not an image, corrupt or truncated.
    """
    with _truncated_images_rejected():
        try:
            with Image.open(path) as image:
                upright = ImageOps.exif_transpose(image)
                return _to_rgb(upright)
        except FileNotFoundError as exc:
            raise ImageLoadError(f"image '{path}' does not exist") from exc
        except Exception as exc:  # PIL signals bad data with many exception types
            raise ImageLoadError(f"cannot load image '{path}': {type(exc).__name__}: {exc}") from exc
