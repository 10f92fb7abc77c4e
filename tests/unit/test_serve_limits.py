"""Image limits of the service (pv2tea.serve.limits): header-checked pixels, formats, paths, base64."""

from __future__ import annotations

import base64
import io
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from png_checks import png_claiming
from pv2tea.serve.limits import ImageRejected, Limits, decode_base64, open_image, read_image_file


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


@pytest.mark.parametrize("size", [(20_000, 1), (1, 20_000), (40_000_000, 1), (21, 1)])
def test_an_absurd_aspect_ratio_is_refused_from_the_header(size, monkeypatch):
    decoded, load = [], ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or load(self))
    with pytest.raises(ImageRejected, match=r"aspect ratio .*at most 20:1 \(--max-aspect-ratio\)") as caught:
        open_image(png_claiming(*size), Limits())
    assert caught.value.reason == "aspect" and decoded == []
    assert open_image(png_claiming(20, 1), Limits()).size == (20, 1)  # at the limit
    with pytest.raises(ImageRejected, match="aspect"):
        open_image(png_claiming(20, 1), Limits(max_aspect_ratio=19.5))
    with pytest.raises(ValueError, match="max_aspect_ratio"):
        Limits(max_aspect_ratio=0.5)


def _eval_transform(size: int):
    import timm.data

    return timm.data.create_transform(
        input_size=(3, size, size),
        crop_pct=1.0,
        is_training=False,
        interpolation="bicubic",
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
    )


def _preprocessor(size: int):
    from pv2tea.config import Config
    from pv2tea.data.dataset import Preprocessor

    data_config = {"input_size": (3, size, size), "interpolation": "bicubic", "crop_mode": "center"}
    data_config |= {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    return Preprocessor(Config(), None, data_config, [])  # type: ignore[arg-type]


@pytest.fixture
def resized(monkeypatch):
    """The sizes every resize of the test produced."""
    import torchvision.transforms.functional as F

    sizes, resize = [], F.resize

    def spy(img, *args, **kwargs):
        out = resize(img, *args, **kwargs)
        sizes.append(out.size if isinstance(out, Image.Image) else tuple(out.shape[-2:])[::-1])
        return out

    monkeypatch.setattr(F, "resize", spy)
    return sizes


def test_the_resize_of_an_elongated_image_is_bounded_by_its_output(resized):
    """A 20,000 × 1 image used to be resized to 640,000 × 32 for a 32 × 32 input (2.6 million × 128 at 128: ~3 s and
    ~2 GB); the preprocessing cuts what the center crop drops before resizing."""
    pre = _preprocessor(32)
    for size in [(20_000, 1), (1, 20_000), (3_000, 7)]:
        resized.clear()
        tensor = pre.transform(Image.new("RGB", size, (200, 10, 10)))
        assert tuple(tensor.shape) == (3, 32, 32)
        [(w, h)] = resized
        assert w * h <= 2 * 32 * 32 + 32, (size, (w, h))
        assert torch.allclose(tensor, tensor[:, :1, :1].expand_as(tensor))  # a single colour stays one


def test_the_bounded_resize_keeps_what_the_center_crop_keeps():
    """Where the cut is not needed the output is timm's, bit for bit; where it is, a smooth image comes out the same
    within resampling rounding."""
    pre, plain = _preprocessor(32), _eval_transform(32)
    vertical = Image.linear_gradient("L").convert("RGB")  # dark at the top, light at the bottom
    horizontal = vertical.rotate(90)
    for size in [(64, 40), (40, 64), (63, 32)]:  # within 2:1 of the square input: untouched
        image = horizontal.resize(size)
        assert torch.equal(pre.transform(image), plain(image))
    for size in [(700, 40), (40, 700), (701, 33)]:  # varying along the side that is cut
        image = (horizontal if size[0] > size[1] else vertical).resize(size)
        assert torch.allclose(pre.transform(image), plain(image), atol=0.02)


@settings(max_examples=60, deadline=None, database=None)
@given(width=st.integers(1, 4_000), height=st.integers(1, 4_000), size=st.sampled_from([8, 24, 32]))
def test_any_aspect_ratio_is_resized_within_a_bound_of_the_output(width, height, size):
    import torchvision.transforms.functional as F

    if width * height > 400_000:
        width = max(1, 400_000 // height)
    sizes, resize = [], F.resize
    F.resize = lambda img, *a, **k: sizes.append((out := resize(img, *a, **k)).size) or out  # type: ignore[assignment]
    try:
        tensor = _preprocessor(size).transform(Image.new("RGB", (width, height), (1, 2, 3)))
    finally:
        F.resize = resize  # type: ignore[assignment]
    assert tuple(tensor.shape) == (3, size, size)
    [(w, h)] = sizes
    assert w * h <= 3 * size * size, ((width, height), (w, h))  # (RESIZE_MARGIN + 1 / shorter side) × the output


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread scheduling priority is Linux's")
def test_image_decoding_threads_yield_to_the_model_thread():
    """The decode pool's initializer lowers its threads' priority (the model thread keeps the CPU under a flood of
    large images), and leaves the calling (model) thread's as it was."""
    import os
    import threading

    from pv2tea.serve.limits import DECODE_NICENESS, lower_decode_priority

    main = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen: list[int] = []

    def worker() -> None:
        lower_decode_priority()
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [min(19, main + DECODE_NICENESS)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main
