"""PNG figures (paper Figures 2, 4, 5, 7, learning curves, ablations) and the HTML report page."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pv2tea.eval.metrics import Example, source_aware_report
from pv2tea.eval.retrieval import retrieval_metrics
from pv2tea.viz import (
    Section,
    ablation_bars,
    attribute_f1,
    learning_curves,
    mask_overlays,
    overlay_heatmap,
    retrieval_vs_alpha,
    source_aware_bars,
    upsample_mask,
    write_html_report,
)

COLOR = {"attribute": "color", "multi_value": True}
PATTERN = {"attribute": "pattern", "multi_value": False}
GRAY = (128, 128, 128)


def _full_report() -> dict[str, Any]:
    """Both sources present: color (text and image) and pattern (text only)."""
    return source_aware_report(
        [
            Example(("red",), ("red",), "text", **COLOR),
            Example(("blue",), ("blue",), "image", **COLOR),
            Example(("blue", "white"), ("blue",), "image", **COLOR),
            Example(("solid",), ("solid",), "text", **PATTERN),
        ]
    )


def _text_only_report() -> dict[str, Any]:
    """No image-source example: every image metric and gap is None."""
    report = source_aware_report([Example(("striped",), ("dotted",), "text", **PATTERN)])
    assert report["by_source"]["image"]["f1"] is None
    return report


def _open_png(path: Path, min_size: tuple[int, int], max_size: tuple[int, int]) -> np.ndarray:
    """Open a written PNG with PIL, check its rough pixel size and return it as RGB."""
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert min_size[0] <= width <= max_size[0] and min_size[1] <= height <= max_size[1], image.size
        return np.asarray(image.convert("RGB"))


def _retrieval(alpha: float) -> dict[str, float]:
    """Retrieval metrics of a similarity matrix that gets sharper as alpha nears 0.4."""
    rng = np.random.default_rng(int(alpha * 10))
    return retrieval_metrics(rng.normal(size=(16, 16)) + (3.0 - 4.0 * abs(alpha - 0.4)) * np.eye(16))


# --- source-aware and per-attribute bars ----------------------------------------------------


def test_source_aware_bars_none_metrics_and_rows_of_methods(tmp_path: Path) -> None:
    reports = {"OpenTag": _full_report(), "PV2TEA": _text_only_report()}
    out = source_aware_bars(reports, tmp_path / "sub" / "source.png")
    assert out == tmp_path / "sub" / "source.png"
    one_row = _open_png(out, (600, 350), (1300, 700))
    four = source_aware_bars({str(i): _full_report() for i in range(4)}, tmp_path / "four.png")
    two_rows = _open_png(four, (900, 700), (1600, 1200))  # 3 panels per row at most
    assert two_rows.shape[0] > one_row.shape[0] + 300


def test_none_values_are_missing_bars_labelled_na() -> None:
    from matplotlib.figure import Figure

    from pv2tea.viz.figures import _bars

    ax = Figure().add_subplot()
    _bars(ax, [0.0, 1.0, 2.0], [40.0, None, 0.0], thickness=0.5, color="C0")
    assert [p.get_height() for p in ax.patches] == [40.0, 0.0]  # no bar for None, a real 0 bar
    assert [t.get_text() for t in ax.texts] == ["40.0", "n/a", "0.0"]


def test_source_aware_bars_rejects_empty_and_unknown_metric(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        source_aware_bars({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="unknown metric 'auc'"):
        source_aware_bars({"m": _full_report()}, tmp_path / "x.png", metric_names=("f1", "auc"))
    assert not (tmp_path / "x.png").exists()


def test_attribute_f1_with_missing_attributes_and_none(tmp_path: Path) -> None:
    reports = {"full": _full_report(), "pattern only": _text_only_report()}
    out = attribute_f1(reports, tmp_path / "attr.png")
    _open_png(out, (700, 250), (1300, 900))
    with pytest.raises(ValueError, match="empty"):
        attribute_f1({}, tmp_path / "empty.png")


# --- retrieval ------------------------------------------------------------------------------


def test_retrieval_vs_alpha_with_and_without_baseline(tmp_path: Path) -> None:
    results = {alpha: _retrieval(alpha) for alpha in (0.8, 0.0, 0.4, 0.2)}  # unsorted on purpose
    plain = _open_png(retrieval_vs_alpha(results, tmp_path / "plain.png"), (700, 400), (1300, 800))
    with_base = retrieval_vs_alpha(results, tmp_path / "base.png", baseline=_retrieval(1.5))
    assert not np.array_equal(plain, _open_png(with_base, (700, 400), (1300, 800)))


def test_retrieval_vs_alpha_none_values_single_alpha_and_errors(tmp_path: Path) -> None:
    gappy = {0.4: _retrieval(0.4), 0.6: {**_retrieval(0.6), "r_mean": None, "img_r1": None}}
    baseline = {**_retrieval(1.5), "r_mean": None}
    _open_png(retrieval_vs_alpha(gappy, tmp_path / "gappy.png", baseline), (700, 400), (1300, 800))
    _open_png(retrieval_vs_alpha({0.4: _retrieval(0.4)}, tmp_path / "one.png"), (700, 400), (1300, 800))
    with pytest.raises(ValueError, match="empty"):
        retrieval_vs_alpha({}, tmp_path / "empty.png")
    with pytest.raises(ValueError, match="lacks retrieval metric 'txt_r1'"):
        retrieval_vs_alpha({0.4: {"r_mean": 50.0}}, tmp_path / "bad.png")


# --- masks ----------------------------------------------------------------------------------


def test_upsample_mask_is_bilinear_and_validates() -> None:
    mask = np.array([[0.0, 1.0], [1.0, 0.0]])
    up = upsample_mask(mask, (8, 6))  # (width, height)
    assert up.shape == (6, 8) and up.dtype == np.float32
    assert up.min() >= 0.0 and up.max() <= 1.0
    assert up[0, 0] < 0.1 and up[0, -1] > 0.9 and up[-1, 0] > 0.9 and up[-1, -1] < 0.1
    assert len(np.unique(np.round(up, 3))) > 4  # interpolated, not nearest-neighbour blocks
    for bad in (np.zeros(4), np.zeros((0, 2)), np.array([[0.5, 2.0]]), np.array([[np.nan]])):
        with pytest.raises(ValueError):
            upsample_mask(bad, (8, 8))


def test_overlay_heatmap_tints_by_mask_value() -> None:
    image = Image.new("RGB", (40, 40), GRAY)
    left_hot = np.array([[1.0, 0.0], [1.0, 0.0]])
    overlay = np.asarray(overlay_heatmap(image, left_hot)).astype(int)
    assert overlay.shape == (40, 40, 3)
    plain = np.asarray(image).astype(int)
    assert np.abs(overlay - plain).max(axis=2).min() > 20  # every pixel is tinted
    left, right = overlay[:, :5].reshape(-1, 3).mean(0), overlay[:, -5:].reshape(-1, 3).mean(0)
    assert left[0] > left[2] + 50 and right[2] > right[0] + 50  # jet: 1 is red, 0 is blue
    uniform = np.asarray(overlay_heatmap(image, np.full((2, 2), 0.5))).astype(int)
    assert (uniform == uniform[0, 0]).all()


def test_mask_overlays_draws_heat_map(tmp_path: Path) -> None:
    image = Image.new("RGB", (96, 96), GRAY)
    gradient = np.linspace(0.0, 1.0, 16).reshape(4, 4)
    drawn = _open_png(
        mask_overlays([image], [gradient], ["storage bag"], tmp_path / "grad.png"), (300, 200), (900, 600)
    )
    flat_png = mask_overlays([image], [np.zeros((4, 4))], ["storage bag"], tmp_path / "flat.png")
    flat = _open_png(flat_png, (300, 200), (900, 600))
    assert drawn.shape == flat.shape  # same layout: image, overlay, colorbar
    changed = np.abs(drawn.astype(int) - flat.astype(int)).max(axis=2) > 30
    assert changed.sum() > 2000  # the overlay differs where the mask differs
    # columns holding the unchanged original (plain gray) lie left of every changed pixel
    gray_cols = np.where((np.abs(drawn.astype(int) - GRAY).max(axis=2) <= 2).sum(axis=0) > 50)[0]
    assert gray_cols.size > 0 and gray_cols.max() < np.where(changed.any(axis=0))[0].min()


def test_mask_overlays_none_masks_grid_and_errors(tmp_path: Path) -> None:
    images = [
        Image.new("RGB", (120, 80), (200, 30, 30)),
        Image.new("L", (64, 64), 90),
        Image.new("RGBA", (50, 90)),
    ]
    masks = [None, np.random.default_rng(0).uniform(size=(4, 4)), None]
    out = mask_overlays(images, masks, ["red rug", "gray mug", "transparent"], tmp_path / "m.png", ncols=2)
    _open_png(out, (700, 400), (1400, 900))
    only_none = mask_overlays(images[:1], [None], ["no mask at all"], tmp_path / "n.png")
    _open_png(only_none, (300, 200), (800, 600))
    with pytest.raises(ValueError, match="empty"):
        mask_overlays([], [], [], tmp_path / "e.png")
    with pytest.raises(ValueError, match="2 images, 1 masks"):
        mask_overlays(images[:2], [None], ["a", "b"], tmp_path / "e.png")
    with pytest.raises(ValueError, match="sigmoid"):
        mask_overlays(images[:1], [np.full((4, 4), 3.0)], ["logits"], tmp_path / "e.png")


# --- learning curves and ablations ------------------------------------------------------------


def test_learning_curves_subsets_duplicates_and_weight_panel(tmp_path: Path) -> None:
    epochs = [
        {"epoch": 1, "step": 10, "loss": 3.0, "loss_gen": 2.0, "loss_sc": 1.0},
        {"epoch": 2, "loss": 2.5, "loss_gen": 1.8, "finished": False},  # resumed below
        {"epoch": 2, "loss": 2.0, "loss_gen": 1.5, "loss_ct": 0.5, "val": {"overall": {"f1": 40.0}}},
        {"epoch": 3, "loss": 1.5, "val": {"overall": {"f1": None}}},
    ]
    two = _open_png(learning_curves(epochs, tmp_path / "two.png"), (900, 400), (1300, 600))
    weighted = [{**e, "weight_mean": 0.9} for e in epochs]
    three = _open_png(learning_curves(weighted, tmp_path / "three.png"), (1300, 400), (1800, 600))
    assert three.shape[1] > two.shape[1]  # a third panel for the sample weights
    _open_png(learning_curves([{"epoch": 1}], tmp_path / "bare.png"), (900, 400), (1300, 600))


def test_learning_curves_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        learning_curves([], tmp_path / "e.png")
    with pytest.raises(ValueError, match="line 1 has no 'epoch'"):
        learning_curves([{"epoch": 1, "loss": 1.0}, {"loss": 0.5}], tmp_path / "e.png")


def test_ablation_bars_with_missing_and_none(tmp_path: Path) -> None:
    table = {
        "w/o L_sc": {"f1": (76.07, 0.40), "precision": (80.03, 0.5)},
        "w/o Smooth": {"f1": (77.76, None)},
        "w/o NR": {"precision": (80.87, 0.2)},
        "PV2TEA": {"f1": (None, None)},
    }
    out = ablation_bars(table, tmp_path / "ablation.png")
    _open_png(out, (700, 250), (1200, 600))
    _open_png(ablation_bars(table, tmp_path / "p.png", metric="precision"), (700, 250), (1200, 600))
    with pytest.raises(ValueError, match="empty"):
        ablation_bars({}, tmp_path / "e.png")
    with pytest.raises(ValueError, match="must be a number"):
        ablation_bars({"x": {"f1": ("high", 0.1)}}, tmp_path / "e.png")


# --- HTML report ----------------------------------------------------------------------------


def test_write_html_report(tmp_path: Path) -> None:
    out_dir = tmp_path / "report"
    figure = source_aware_bars({"PV2TEA": _full_report()}, out_dir / "figs" / "source aware.png")
    outside = ablation_bars({"PV2TEA": {"f1": (78.77, 0.1)}}, tmp_path / "elsewhere" / "ablation.png")
    sections = [
        Section(
            "Source-aware evaluation", [figure], ["all  P  R\ntext 1 <2>"], notes="x < y & <script>alert(1)</script>"
        ),
        Section("Ablations & more", [outside], []),
    ]
    index = write_html_report(out_dir, "PV2TEA <run 7>", sections)
    assert index == out_dir / "index.html"
    page = index.read_text(encoding="utf-8")
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "x &lt; y &amp;" in page and "<title>PV2TEA &lt;run 7&gt;</title>" in page
    assert "text 1 &lt;2&gt;</pre>" in page
    for anchor, heading in (("section-1", "Source-aware evaluation"), ("section-2", "Ablations &amp; more")):
        assert f'<a href="#{anchor}">{heading}</a>' in page  # table of contents
        assert f'id="{anchor}"' in page and f"<h2>{heading}</h2>" in page
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sources == ["figs/source%20aware.png", "../elsewhere/ablation.png"]
    for src in sources:
        assert (out_dir / src.replace("%20", " ")).is_file()


def test_write_html_report_missing_figure(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.png"):
        write_html_report(tmp_path, "t", [Section("s", [tmp_path / "missing.png"], [])])
