"""Image limits of the service (pv2tea.serve.limits): header-checked pixels, formats, paths, base64."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from PIL import Image, ImageFile

from pv2tea.serve.limits import ImageRejected, Limits, decode_base64, open_image, read_image_file


def png_claiming(width: int, height: int) -> bytes:
    """A valid-looking PNG of ~100 bytes whose header claims width × height RGB pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("size", [(50_000, 50_000), (7_000, 7_000)])  # beyond Pillow's bomb guard / beyond ours
def test_huge_dimension_header_is_refused_without_decoding(size, monkeypatch):
    data = png_claiming(*size)
    assert len(data) < 1024
    decoded, load = [], ImageFile.ImageFile.load

    def spy(self):  # the pixel decoding
        decoded.append(self.size)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    with pytest.raises(ImageRejected, match="pixels") as caught:
        open_image(data, Limits())
    assert caught.value.reason == "pixels" and decoded == []
    open_image(png_claiming(4, 4), Limits())  # the spy sees a decode that passes the limits
    assert decoded and set(decoded) == {(4, 4)}


def test_formats_modes_and_corrupt_files():
    limits = Limits(formats=("PNG", "jpeg"), max_image_pixels=64 * 64)
    rgb = open_image(encoded(Image.new("RGB", (8, 6), (10, 20, 30)), "PNG"), limits)
    assert rgb.mode == "RGB" and rgb.size == (8, 6)
    palette = Image.new("P", (4, 4))
    palette.info["transparency"] = 0
    assert open_image(encoded(palette, "PNG", transparency=0), limits).getpixel((0, 0)) == (255, 255, 255)
    assert open_image(encoded(Image.new("CMYK", (4, 4)), "JPEG"), limits).mode == "RGB"
    assert open_image(encoded(Image.new("I;16", (4, 4)), "PNG"), limits).mode == "RGB"
    for data, reason in [
        (encoded(Image.new("RGB", (4, 4)), "GIF"), "format"),
        (encoded(Image.new("RGB", (65, 64)), "PNG"), "pixels"),
        (b"plain text", "corrupt"),
        (encoded(Image.new("RGB", (32, 32)), "PNG")[:-30], "corrupt"),  # truncated
        (b"", "corrupt"),
    ]:
        with pytest.raises(ImageRejected) as caught:
            open_image(data, limits)
        assert caught.value.reason == reason, (reason, str(caught.value))
    with pytest.raises(ValueError, match="unknown image format"):
        Limits(formats=("PNGG",))


def test_base64_and_size_limits():
    limits = Limits(max_image_bytes=100)
    assert decode_base64("data:image/png;base64," + base64.b64encode(b"x" * 100).decode(), limits) == b"x" * 100
    for data, reason in [
        (base64.b64encode(b"x" * 101).decode(), "bytes"),
        ("A" * 10_000, "bytes"),
        ("not base64!", "base64"),
    ]:
        with pytest.raises(ImageRejected) as caught:
            decode_base64(data, limits)
        assert caught.value.reason == reason


def test_paths_stay_under_the_root_and_symlinks_leaving_it_are_refused(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(b"inside")
    (tmp_path / "secret.png").write_bytes(b"outside")
    (root / "leak.png").symlink_to(tmp_path / "secret.png")
    (root / "alias.png").symlink_to(root / "sub" / "a.png")  # a symlink staying inside is fine
    limits = Limits(max_image_bytes=6)
    assert read_image_file(root, "sub/a.png", limits) == b"inside"
    assert read_image_file(root, "alias.png", limits) == b"inside"
    for name, message in [
        ("leak.png", "outside the image root"),
        ("../secret.png", "outside the image root"),
        (str(tmp_path / "secret.png"), "outside the image root"),
        ("sub", "not a file"),
        ("missing.png", "not a file"),
        ("a\x00b", "not a valid path"),
    ]:
        with pytest.raises(ImageRejected, match=message):
            read_image_file(root, name, limits)
    (root / "big.png").write_bytes(b"1234567")
    with pytest.raises(ImageRejected, match="larger than") as caught:
        read_image_file(root, "big.png", limits)
    assert caught.value.reason == "bytes"
