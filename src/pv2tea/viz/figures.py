"""PNG figures of PV2TEA (ACL Findings 2023) results, after the paper's Figures 2, 4, 5 and 7.

Every figure function takes plain data (report dicts, metric dicts, arrays, PIL images),
draws one :class:`matplotlib.figure.Figure` on the non-interactive Agg canvas (no pyplot
state), writes one PNG at :data:`DPI` to ``path`` (creating its folder) and returns the path.

* :func:`source_aware_bars` - P/R/F1 when the gold value is in the text vs only in the
  image, per method (Figure 2);
* :func:`attribute_f1` - per-attribute F1 of several methods;
* :func:`retrieval_vs_alpha` - cross-modal retrieval against the label-smoothing softness
  ``alpha`` of S1, optionally against a binary-matching baseline (Figure 4);
* :func:`mask_overlays` - learned patch masks of S2 over the product images (Figures 5, 7);
* :func:`learning_curves` - loss terms and validation F1 per epoch of a run's
  ``metrics.jsonl``;
* :func:`ablation_bars` - mean +- std of one metric per ablation variant (Tables 2, 4-6).

Reports are the dicts of :func:`pv2tea.eval.metrics.source_aware_report`; metrics are
percentages, and an undefined metric (``None``) is drawn as a missing bar or point labelled
``n/a``, never as zero.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pv2tea.eval.metrics import SOURCES
from pv2tea.eval.report import ALL_ATTRIBUTES
from pv2tea.extras import missing_extra

try:
    from matplotlib import colormaps
    from matplotlib.axes import Axes
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator
except ImportError as exc:
    raise missing_extra("report", "report", exc) from exc

__all__ = [
    "DPI",
    "MASK_CMAP",
    "ablation_bars",
    "attribute_f1",
    "learning_curves",
    "mask_overlays",
    "overlay_heatmap",
    "retrieval_vs_alpha",
    "source_aware_bars",
    "upsample_mask",
]

#: Resolution of every written PNG.
DPI = 120
#: Colormap of the mask heat maps (0 = pruned background, 1 = kept foreground).
MASK_CMAP = "jet"

_NA = "n/a"
_VALUE_FONT = 7.5
_PALETTE: tuple[str, ...] = (
    "#4C72B0",
    "#DD8452",
    "#55A868",
    "#C44E52",
    "#8172B3",
    "#937860",
    "#DA8BC3",
    "#8C8C8C",
    "#CCB974",
    "#64B5CD",
)
_SOURCE_COLORS = dict(zip(SOURCES, _PALETTE))
_METRIC_LABELS = {"precision": "P", "recall": "R", "f1": "F1", "accuracy": "Acc"}
#: (retrieval_metrics key, paper label) of the Figure 4 curves.
_RETRIEVAL_SERIES: tuple[tuple[str, str], ...] = (
    ("txt_r1", "T@1"),
    ("img_r1", "I@1"),
    ("txt_r_mean", "T@M"),
    ("img_r_mean", "I@M"),
    ("r_mean", "R@Mean"),
)
_THUMBNAIL = (256, 256)

PathArg = str | PathLike[str]


# --- shared drawing helpers ----------------------------------------------------------------


def _new_figure(width: float, height: float) -> Figure:
    """A constrained-layout figure (inches) on an Agg canvas."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: PathArg) -> Path:
    """Write ``fig`` as a PNG at ``DPI`` and return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, format="png")
    return out


def _number(value: Any, what: str) -> float | None:
    """A metric as a float; ``None`` (and NaN) stay missing."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number or None, got {value!r}") from None
    return number if math.isfinite(number) else None


def _metric_label(metric: str) -> str:
    """Short axis label of a metric name (``precision`` -> ``P``)."""
    return _METRIC_LABELS.get(metric, metric)


def _annotate(ax: Axes, pos: float, end: float, text: str, horizontal: bool, color: str = "black") -> None:
    """A small label just past the end of a bar (or at the axis for a missing one)."""
    if horizontal:
        ax.annotate(
            text,
            (end, pos),
            xytext=(3, 0),
            textcoords="offset points",
            ha="left",
            va="center",
            fontsize=_VALUE_FONT,
            color=color,
        )
    else:
        ax.annotate(
            text,
            (pos, end),
            xytext=(0, 2),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=_VALUE_FONT,
            color=color,
        )


def _bars(
    ax: Axes,
    positions: Sequence[float] | np.ndarray,
    values: Sequence[float | None],
    *,
    thickness: float,
    color: str,
    horizontal: bool = False,
    errors: Sequence[float | None] | None = None,
    decimals: int = 1,
) -> None:
    """Value-labelled bars (optionally with error bars); ``None`` values get an ``n/a`` mark."""
    errs = errors if errors is not None else [None] * len(values)
    for pos, value, err in zip(positions, values, errs):
        if value is None:
            _annotate(ax, pos, 0.0, _NA, horizontal, color="dimgray")
            continue
        err_kw: dict[str, Any] = {}
        if err is not None:
            err_kw = {"xerr" if horizontal else "yerr": err, "capsize": 3, "ecolor": "black"}
        if horizontal:
            ax.barh(pos, value, height=thickness, color=color, **err_kw)
        else:
            ax.bar(pos, value, width=thickness, color=color, **err_kw)
        text = f"{value:.{decimals}f}" + ("" if err is None else f" ± {err:.{decimals}f}")
        _annotate(ax, pos, value + (err or 0.0), text, horizontal)


def _require(items: Sequence[Any] | Mapping[Any, Any], what: str) -> None:
    """Refuse to draw a figure from no data."""
    if len(items) == 0:
        raise ValueError(f"{what} is empty: nothing to draw")


# --- source-aware and per-attribute scores --------------------------------------------------


def _block_metric(block: Mapping[str, Any], metric: str, where: str) -> float | None:
    """One metric of a Scores dict, with a clear error for an unknown metric name."""
    if metric not in block:
        raise ValueError(f"unknown metric {metric!r} in {where}; available: {sorted(block)}")
    return _number(block[metric], f"{where}[{metric!r}]")


def source_aware_bars(
    reports: Mapping[str, Mapping[str, Any]],
    path: PathArg,
    metric_names: Sequence[str] = ("precision", "recall", "f1"),
) -> Path:
    """Per method, grouped bars of each metric for gold source text vs image (Figure 2).

    Args:
        reports: method name -> source-aware report.
        path: PNG to write.
        metric_names: keys of the report's ``Scores`` dicts to draw, e.g. ``"accuracy"``.
    """
    _require(reports, "reports")
    _require(metric_names, "metric_names")
    ncols = min(len(reports), 3)
    nrows = math.ceil(len(reports) / ncols)
    fig = _new_figure(1.0 + 3.3 * ncols, 0.9 + 3.3 * nrows)
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    x = np.arange(len(metric_names), dtype=float)
    width = 0.38
    for ax, (method, report) in zip(axes, reports.items()):
        counts = []
        for offset, source in zip((-width / 2, width / 2), SOURCES):
            block = report["by_source"][source]
            values = [_block_metric(block, m, f"{method} source {source}") for m in metric_names]
            _bars(ax, x + offset, values, thickness=width, color=_SOURCE_COLORS[source])
            counts.append(f"{source} n={block.get('n', '?')}")
        ax.set_title(f"{method}\n({', '.join(counts)})", fontsize=10)
        ax.set_xticks(x, [_metric_label(m) for m in metric_names])
        ax.set_ylim(0, 110)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    for ax in axes[::ncols]:
        ax.set_ylabel("score (%)")
    for ax in axes[len(reports) :]:
        ax.set_visible(False)
    handles = [
        Patch(color=_SOURCE_COLORS["text"], label="source: text (gold value in the text)"),
        Patch(color=_SOURCE_COLORS["image"], label="source: image (gold value only in the image)"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=9, frameon=False)
    fig.suptitle("Source-aware evaluation", fontsize=12)
    return _save(fig, path)


def attribute_f1(reports: Mapping[str, Mapping[str, Any]], path: PathArg) -> Path:
    """Horizontal bars of F1 per attribute (first row: all attributes), one bar per method.

    An attribute missing from a method's report, or with an undefined F1, is marked ``n/a``.
    """
    _require(reports, "reports")
    attributes = sorted({a for report in reports.values() for a in report["by_attribute"]})
    rows = [ALL_ATTRIBUTES, *attributes]
    n_methods = len(reports)
    group = 0.8
    thickness = group / n_methods
    fig = _new_figure(8.0, 1.3 + len(rows) * (0.25 + 0.22 * n_methods))
    ax = fig.add_subplot()
    y = np.arange(len(rows), dtype=float)
    handles = []
    for m, (method, report) in enumerate(reports.items()):
        values = []
        for row in rows:
            block = report if row == ALL_ATTRIBUTES else report["by_attribute"].get(row)
            values.append(None if block is None else _number(block["overall"]["f1"], f"{method} {row} f1"))
        color = _PALETTE[m % len(_PALETTE)]
        offset = -group / 2 + thickness * (m + 0.5)
        _bars(ax, y + offset, values, thickness=thickness, color=color, horizontal=True)
        handles.append(Patch(color=color, label=method))
    ax.set_yticks(y, rows)
    ax.invert_yaxis()
    ax.set_xlim(0, 112)
    ax.set_xlabel("F1 (%)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title("F1 per attribute", fontsize=12)
    fig.legend(handles=handles, loc="outside right upper", fontsize=9, frameon=False)
    return _save(fig, path)


# --- retrieval (S1) -------------------------------------------------------------------------


def _retrieval_value(metrics: Mapping[str, Any], key: str, where: str) -> float:
    """One retrieval metric as a float, NaN when undefined (a gap in the line)."""
    if key not in metrics:
        raise ValueError(f"{where} lacks retrieval metric {key!r}; see pv2tea.eval.retrieval")
    value = _number(metrics[key], f"{where}[{key!r}]")
    return math.nan if value is None else value


def retrieval_vs_alpha(
    results: Mapping[float, Mapping[str, Any]],
    path: PathArg,
    baseline: Mapping[str, Any] | None = None,
    baseline_label: str = "binary matching",
) -> Path:
    """Retrieval scores against the softness ``alpha`` of the label-smoothed contrast (Figure 4).

    Args:
        results: ``alpha`` -> :func:`pv2tea.eval.retrieval.retrieval_metrics` dict of a model
            trained with that softness.
        path: PNG to write.
        baseline: optional metrics of a model aligned otherwise (e.g. binary image-text
            matching), drawn as dashed horizontal lines in the colour of each metric.
        baseline_label: legend name of the baseline.

    Lines show T@1, I@1 (recall at rank 1), T@M, I@M (mean recall over ranks 1, 5, 10) and
    R@Mean; the best ``alpha`` by R@Mean is marked.
    """
    _require(results, "results")
    alphas = sorted(results)
    fig = _new_figure(8.5, 4.8)
    ax = fig.add_subplot()
    handles: list[Line2D] = []
    for i, (key, label) in enumerate(_RETRIEVAL_SERIES):
        color = _PALETTE[i]
        ys = [_retrieval_value(results[a], key, f"results[{a}]") for a in alphas]
        emphasis = key == "r_mean"
        (line,) = ax.plot(alphas, ys, marker="o", color=color, label=label, lw=2.4 if emphasis else 1.5)
        handles.append(line)
        level = math.nan if baseline is None else _retrieval_value(baseline, key, "baseline")
        if not math.isnan(level):
            ax.axhline(level, color=color, ls="--", lw=1.1)
    r_mean = np.array([_retrieval_value(results[a], "r_mean", f"results[{a}]") for a in alphas])
    if not np.isnan(r_mean).all():
        best = int(np.nanargmax(r_mean))
        ax.annotate(
            f"best α = {alphas[best]:g}\nR@Mean {r_mean[best]:.1f}",
            (alphas[best], r_mean[best]),
            xytext=(0, 14),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8,
            arrowprops={"arrowstyle": "-", "color": "gray"},
        )
    if baseline is not None:
        handles.append(Line2D([], [], color="gray", ls="--", label=f"{baseline_label} (dashed)"))
    ax.set_xticks(alphas, [f"{a:g}" for a in alphas])
    ax.set_xlabel("softness α of the label-smoothed contrast")
    ax.set_ylabel("retrieval score (%)")
    ax.grid(alpha=0.3)
    ax.margins(y=0.15)
    ax.set_title("Cross-modal retrieval vs α", fontsize=12)
    fig.legend(handles=handles, loc="outside right upper", fontsize=9, frameon=False)
    return _save(fig, path)


# --- attention masks (S2) ------------------------------------------------------------------


def upsample_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly upsample a coarse ``(h, w)`` patch mask to an image ``size`` (width, height).

    Returns a float32 ``(height, width)`` array in [0, 1]. Raises ``ValueError`` for a mask
    that is not a non-empty 2-D array of values in [0, 1] (e.g. logits before the sigmoid).
    """
    arr = np.asarray(mask, dtype=np.float32)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"a mask must be a non-empty (h, w) array, got shape {arr.shape}")
    if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
        raise ValueError("mask values must lie in [0, 1] (apply the sigmoid to mask logits)")
    up = np.asarray(Image.fromarray(arr).resize(size, Image.Resampling.BILINEAR))
    return np.clip(up, 0.0, 1.0)


def overlay_heatmap(image: Image.Image, mask: np.ndarray, alpha: float = 0.5, cmap: str = MASK_CMAP) -> Image.Image:
    """The RGB image blended with the upsampled mask rendered as a heat map.

    Each pixel is ``(1 - alpha) * image + alpha * cmap(mask)``.
    """
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    heat = colormaps[cmap](upsample_mask(mask, image.size))[..., :3]  # (H, W, 3)
    blended = (1.0 - alpha) * rgb + alpha * heat
    return Image.fromarray(np.round(blended * 255.0).astype(np.uint8))


def _thumbnail(image: Image.Image) -> Image.Image:
    """An RGB copy at most ``_THUMBNAIL`` pixels large (keeps PNGs small and drawing fast)."""
    small = image.convert("RGB")
    small.thumbnail(_THUMBNAIL)
    return small


def mask_overlays(
    images: Sequence[Image.Image],
    masks: Sequence[np.ndarray | None],
    titles: Sequence[str],
    path: PathArg,
    ncols: int = 4,
) -> Path:
    """Each image next to its learned patch mask overlaid as a heat map (Figures 5 and 7).

    Args:
        images: product images.
        masks: per image, an ``(h, w)`` mask in [0, 1] (much coarser than the image, e.g. the
            sigmoid of the S2 mask logits on the patch grid), or ``None`` (image shown alone,
            captioned "no mask").
        titles: per image caption, e.g. its product type.
        path: PNG to write.
        ncols: image/overlay pairs per row.

    One colorbar gives the mask scale (0 = pruned background, 1 = kept foreground).
    """
    _require(images, "images")
    if not len(masks) == len(titles) == len(images):
        raise ValueError(f"got {len(images)} images, {len(masks)} masks and {len(titles)} titles")
    if ncols < 1:
        raise ValueError(f"ncols must be at least 1, got {ncols}")
    cols = min(ncols, len(images))
    rows = math.ceil(len(images) / cols)
    has_mask = any(m is not None for m in masks)
    fig = _new_figure(4.2 * cols + (0.9 if has_mask else 0.0), 0.6 + 2.5 * rows)
    ratios = [1.0] * (2 * cols) + ([0.06] if has_mask else [])
    grid = fig.add_gridspec(rows, len(ratios), width_ratios=ratios)
    for k, (image, mask, title) in enumerate(zip(images, masks, titles)):
        r, c = divmod(k, cols)
        shown = _thumbnail(image)
        ax_image = fig.add_subplot(grid[r, 2 * c])
        ax_image.imshow(shown)
        ax_image.set_title(textwrap.shorten(title, 32, placeholder="…"), fontsize=9)
        ax_mask = fig.add_subplot(grid[r, 2 * c + 1])
        if mask is None:
            ax_mask.text(
                0.5, 0.5, "no mask", ha="center", va="center", fontsize=9, color="dimgray", transform=ax_mask.transAxes
            )
        else:
            ax_mask.imshow(overlay_heatmap(shown, mask))
            h, w = np.shape(mask)
            ax_mask.set_title(f"mask {h}×{w}, mean {float(np.mean(mask)):.2f}", fontsize=9)
        for ax in (ax_image, ax_mask):
            ax.set_axis_off()
    if has_mask:
        mappable = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=MASK_CMAP)
        fig.colorbar(mappable, cax=fig.add_subplot(grid[:, -1]), label="mask value (1 = kept)")
    fig.suptitle("Learned patch masks (category-aware attention pruning)", fontsize=12)
    return _save(fig, path)


# --- training runs and ablations ------------------------------------------------------------


def _field(key: str) -> Callable[[Mapping[str, Any]], Any]:
    """A record's ``key`` (None where missing)."""
    return lambda record: record.get(key)


def _series(records: Sequence[Mapping[str, Any]], get: Callable[[Mapping[str, Any]], Any], what: str) -> list[float]:
    """One value per record (NaN where missing or None)."""
    values = [_number(get(rec), what) for rec in records]
    return [math.nan if v is None else v for v in values]


def _val_f1(record: Mapping[str, Any]) -> Any:
    """The overall validation F1 of a metrics line, or ``None``."""
    val = record.get("val") or {}
    return (val.get("overall") or {}).get("f1")


def _no_data(ax: Axes, text: str) -> None:
    """A centred grey note in an empty panel."""
    ax.text(0.5, 0.5, text, ha="center", va="center", color="dimgray", transform=ax.transAxes)


def learning_curves(epochs: Sequence[Mapping[str, Any]], path: PathArg) -> Path:
    """Loss terms per epoch (left), validation F1 (right) and, if logged, mean sample weight.

    Args:
        epochs: the lines of a run's ``metrics.jsonl``: each has ``"epoch"``, any of the
            loss terms (keys starting with ``"loss"``, e.g. ``loss``, ``loss_gen``,
            ``loss_sc``, ``loss_ct``), optionally ``"weight_mean"`` (S3) and
            ``"val": {"overall": {"f1": ...}}``. A resumed run may log an epoch twice; its
            last line wins.
        path: PNG to write.
    """
    _require(epochs, "epochs")
    by_epoch: dict[int, Mapping[str, Any]] = {}
    for i, record in enumerate(epochs):
        if "epoch" not in record:
            raise ValueError(f"metrics line {i} has no 'epoch'")
        by_epoch[int(record["epoch"])] = record
    xs = sorted(by_epoch)
    records = [by_epoch[x] for x in xs]
    loss_keys = sorted(
        {k for rec in records for k, v in rec.items() if k.startswith("loss") and v is not None},
        key=lambda k: (k != "loss", k),
    )
    has_weight = any(rec.get("weight_mean") is not None for rec in records)
    ncols = 3 if has_weight else 2
    fig = _new_figure(4.4 * ncols, 4.0)
    axes = fig.subplots(1, ncols, sharex=True, squeeze=False)[0]

    ax_loss = axes[0]
    for i, key in enumerate(loss_keys):
        ax_loss.plot(
            xs,
            _series(records, _field(key), key),
            marker="o",
            label=key,
            color=_PALETTE[i % len(_PALETTE)],
            lw=2.4 if key == "loss" else 1.4,
        )
    if loss_keys:
        ax_loss.legend(fontsize=8)
    else:
        _no_data(ax_loss, "no loss terms logged")
    ax_loss.set_title("Training loss (mean per step)", fontsize=11)
    ax_loss.set_ylabel("loss")

    ax_f1 = axes[1]
    f1 = np.array(_series(records, _val_f1, "val f1"))
    if np.isnan(f1).all():
        _no_data(ax_f1, "no validation F1")
    else:
        ax_f1.plot(xs, f1, marker="o", color=_PALETTE[2], lw=2)
        best = int(np.nanargmax(f1))
        ax_f1.annotate(
            f"best {f1[best]:.2f} (epoch {xs[best]})",
            (xs[best], f1[best]),
            xytext=(0, 8),
            textcoords="offset points",
            ha="center",
            fontsize=8,
        )
        ax_f1.margins(y=0.2)
    ax_f1.set_title("Validation F1 (overall)", fontsize=11)
    ax_f1.set_ylabel("F1 (%)")

    if has_weight:
        ax_weight = axes[2]
        ax_weight.plot(
            xs, _series(records, lambda r: r.get("weight_mean"), "weight_mean"), marker="o", color=_PALETTE[4]
        )
        ax_weight.set_title("Mean sample weight (S3)", fontsize=11)
        ax_weight.set_ylabel("weight")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return _save(fig, path)


def ablation_bars(
    table: Mapping[str, Mapping[str, tuple[float, float] | None]],
    path: PathArg,
    metric: str = "f1",
) -> Path:
    """Horizontal bars of ``metric`` mean with ±std error bars, one per variant (top to bottom).

    Args:
        table: variant name -> {metric name: (mean, std)}; a variant without ``metric``, or
            with a ``None`` mean, is marked ``n/a``; a ``None`` std draws no error bar.
        path: PNG to write.
        metric: which metric to draw.
    """
    _require(table, "table")
    variants = list(table)
    means: list[float | None] = []
    stds: list[float | None] = []
    for variant in variants:
        entry = table[variant].get(metric)
        mean, std = (None, None) if entry is None else entry
        means.append(_number(mean, f"{variant} {metric} mean"))
        stds.append(_number(std, f"{variant} {metric} std"))
    label = _metric_label(metric)
    fig = _new_figure(8.0, 1.4 + 0.45 * len(variants))
    ax = fig.add_subplot()
    y = np.arange(len(variants), dtype=float)
    _bars(ax, y, means, thickness=0.6, color=_PALETTE[0], horizontal=True, errors=stds, decimals=2)
    ends = [m + (s or 0.0) for m, s in zip(means, stds) if m is not None]
    ax.set_xlim(0, 1.25 * max(ends) if ends and max(ends) > 0 else 100)
    ax.set_yticks(y, variants)
    ax.invert_yaxis()
    ax.set_xlabel(f"{label} (%)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title(f"Ablation: {label} (mean ± std)", fontsize=12)
    return _save(fig, path)
