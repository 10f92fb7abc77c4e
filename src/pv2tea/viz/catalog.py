"""What a catalogue benchmark shows: F1 per attribute and source, and the products where the photo made the difference.

- :func:`source_figure`: per attribute, ranked F1 on the rows whose text states the gold value and on the rows whose
  value only the photo shows, one bar per model (the extractor, the same recipe without the image, PV2TEA).
- :func:`photo_examples`: the held-out products where PV2TEA, reading the photo, is right while both the extractor (its
  weak label) and the same recipe without the image are wrong ("the photo corrected the extractor"), and where PV2TEA
  is wrong while the model without the image was right ("the photo misled the model").
- :func:`write_catalog_report`: both, as ``report/index.html`` (figure) and ``report/examples.html`` (examples with
  their photos as small JPEG thumbnails in ``report/examples/``, title, weak label, answers and gold).
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pv2tea.decoding.calibration import ScoredRow
from pv2tea.eval.normalize import normalize_value
from pv2tea.viz.figures import _new_figure, _save
from pv2tea.viz.html import Section, write_html_report

__all__ = ["PhotoExample", "photo_examples", "source_figure", "write_catalog_report"]

FIGURE_VARIANTS = ("text_extractor", "tea", "pv2tea")
_COLOURS = {"text_extractor": "#8c8c8c", "tea": "#DD8452", "pv2tea": "#4C72B0"}
THUMBNAIL = 160  # pixels of the longer side of an example's photo


def source_figure(
    attributes: Mapping[str, Mapping[str, Mapping[str, float | None]]],
    path: Path,
    variants: Sequence[str] = FIGURE_VARIANTS,
) -> Path:
    """Two panels (text rows, image rows), an attribute per group of bars, a bar per variant present.

    ``attributes``: {attribute: {variant: {"f1_text", "f1_image"}}} as in :func:`pv2tea.bench.catalog.catalog_headline`.
    """
    names = sorted(attributes)
    shown = [v for v in variants if any(v in attributes[a] for a in names)]
    if not names or not shown:
        raise ValueError("nothing to draw: no attribute has a score of the variants asked")
    fig = _new_figure(max(7.0, 0.9 * len(names) + 2), 6.0)
    axes = fig.subplots(2, 1, sharex=True)
    x = np.arange(len(names))
    width = 0.8 / len(shown)
    for ax, source in zip(axes, ("text", "image")):
        for i, variant in enumerate(shown):
            values = [attributes[a].get(variant, {}).get(f"f1_{source}") for a in names]
            heights = [np.nan if v is None else v for v in values]
            ax.bar(x + (i - (len(shown) - 1) / 2) * width, heights, width, label=variant, color=_COLOURS.get(variant))
        ax.set_ylabel(f"F1, {source} rows")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(ncols=len(shown), loc="lower right", fontsize="small")
    axes[0].set_title("Ranked macro-F1 per attribute, by where the gold value is (text / only the photo)")
    axes[1].set_xticks(x, names, rotation=30, ha="right")
    return _save(fig, path)


@dataclass(frozen=True)
class PhotoExample:
    """One held-out row and what each model answered."""

    kind: str  # "corrected" (the photo fixed the extractor) or "misled" (the photo broke a right answer)
    row_id: str
    attribute: str
    category: str
    text: str
    image: str | None
    weak_label: str
    answer: str  # PV2TEA's
    without_image: str  # the same recipe without the image (TEA)
    gold: str
    margin: float  # PV2TEA's log-probability lead of its answer over the runner-up: most confident first


def _pick(row: ScoredRow) -> tuple[str, float]:
    order = np.argsort(row.model)[::-1]
    lead = float(row.model[order[0]] - row.model[order[1]]) if len(order) > 1 else 0.0
    return row.candidates[int(order[0])], lead


def photo_examples(
    tests: Sequence[Sequence[Any]],
    with_image: Sequence[Sequence[ScoredRow | None]],
    without_image: Sequence[Sequence[ScoredRow | None]],
    per_kind: int = 12,
) -> list[PhotoExample]:
    """The most confident ``per_kind`` corrected and misled rows over the folds (``tests``: each fold's held-out
    records with their weak labels; the other two: each fold's scored rows of PV2TEA and of TEA, in record order)."""
    found: dict[str, list[PhotoExample]] = {"corrected": [], "misled": []}
    for records, ours, theirs in zip(tests, with_image, without_image):
        for record, a, b in zip(records, ours, theirs):
            if a is None or b is None or not record.gold:
                continue
            gold = {normalize_value(v) for v in record.gold}
            answer, margin = _pick(a)
            other, _ = _pick(b)
            weak = "; ".join(record.label)
            right = normalize_value(answer) in gold
            other_right = normalize_value(other) in gold
            weak_right = bool(record.label) and {normalize_value(v) for v in record.label} <= gold
            kind = (
                "corrected"
                if right and not other_right and not weak_right
                else "misled"
                if not right and other_right
                else None
            )
            if kind is None:
                continue
            found[kind].append(
                PhotoExample(
                    kind=kind,
                    row_id=record.id,
                    attribute=record.attribute,
                    category=record.category,
                    text=record.text,
                    image=record.images[0] if record.images else None,
                    weak_label=weak,
                    answer=answer,
                    without_image=other,
                    gold="; ".join(record.gold),
                    margin=margin,
                )
            )
    out: list[PhotoExample] = []
    for kind in ("corrected", "misled"):
        out += sorted(found[kind], key=lambda e: -e.margin)[:per_kind]
    return out


def _thumbnail(image: str | None, folder: Path, name: str) -> str | None:
    """A small JPEG copy of the photo in ``folder``; None when it cannot be read."""
    if image is None:
        return None
    try:
        with Image.open(image) as img:
            img = img.convert("RGB")
            img.thumbnail((THUMBNAIL, THUMBNAIL))
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{name}.jpg"
            img.save(target, format="JPEG", quality=85)
    except (OSError, ValueError):
        return None
    return f"{folder.name}/{target.name}"


_PAGE_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 1em; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: .6em; font-size: .85em; }
.card img { display: block; margin: 0 auto .4em; max-height: 160px; }
.ok { color: #1a7f37; font-weight: 600; } .bad { color: #b42318; font-weight: 600; }
""".strip()


def _card(example: PhotoExample, src: str | None) -> str:
    def mark(value: str) -> str:
        good = normalize_value(value) in {normalize_value(v) for v in example.gold.split("; ")}
        return f'<span class="{"ok" if good else "bad"}">{html.escape(value or "–")}</span>'

    title = example.text if len(example.text) <= 140 else example.text[:137] + "…"
    image = f'<img src="{html.escape(src)}" alt="{html.escape(example.row_id)}">' if src else "<p>(no photo)</p>"
    return (
        f'<div class="card">{image}<b>{html.escape(example.attribute)}</b> of a {html.escape(example.category)}<br>'
        f"<i>{html.escape(title)}</i><br>weak label: {mark(example.weak_label)}<br>"
        f"PV2TEA: {mark(example.answer)}<br>without the photo (TEA): {mark(example.without_image)}<br>"
        f"gold: <b>{html.escape(example.gold)}</b><br><small>{html.escape(example.row_id)}</small></div>"
    )


def examples_page(examples: Sequence[PhotoExample], out_dir: Path, title: str) -> Path:
    """``out_dir/examples.html``: a card per example (photo, title, weak label, answers, gold)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_PAGE_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    headings = {
        "corrected": "The photo corrected the extractor: PV2TEA right, its weak label and the model without the "
        "photo wrong",
        "misled": "The photo misled the model: PV2TEA wrong where the same model without the photo was right",
    }
    for kind, heading in headings.items():
        chosen = [e for e in examples if e.kind == kind]
        parts.append(f"<h2>{html.escape(heading)} ({len(chosen)} shown, most confident first)</h2>")
        cards = [_card(e, _thumbnail(e.image, out_dir / "examples", f"{kind}-{i}")) for i, e in enumerate(chosen)]
        parts.append('<div class="grid">' + "\n".join(cards) + "</div>" if cards else "<p>None.</p>")
    parts.append("</body></html>")
    page = out_dir / "examples.html"
    page.write_text("\n".join(parts), encoding="utf-8")
    return page


def write_catalog_report(
    headline: Mapping[str, Any],
    tables: str,
    examples: Sequence[PhotoExample],
    out_dir: Path,
    title: str,
) -> Path:
    """``out_dir/index.html`` (the per-attribute, per-source figure and the tables) and ``out_dir/examples.html``."""
    figure = source_figure(headline["attributes"], out_dir / "source_f1.png")
    page = examples_page(examples, out_dir, f"{title}: where the photo made the difference")
    notes = (
        f"Examples: {page.name} ({sum(e.kind == 'corrected' for e in examples)} corrected, "
        f"{sum(e.kind == 'misled' for e in examples)} misled shown)."
    )
    return write_html_report(out_dir, title, [Section("F1 by attribute and source", [figure], [tables], notes)])
