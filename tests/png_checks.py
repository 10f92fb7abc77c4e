"""Checks on written figures: a PNG of a figure's size with something drawn on it (not only a file of some bytes)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def assert_drawn_png(path: Path) -> None:
    """A PNG at least 300 x 200 pixels, not blank: several colours, and ink (non-background) on over 1% of it."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] >= 300 and image.size[1] >= 200, (path.name, image.size)
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    assert len(colours) >= 10, (path.name, len(colours))
    assert 1 - counts.max() / len(pixels) > 0.01, path.name  # the most common colour (background) is not all


def png_claiming(width: int, height: int) -> bytes:
    """A valid-looking PNG of ~100 bytes whose header claims width × height RGB pixels (a decompression bomb's
    header without its pixels)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )
