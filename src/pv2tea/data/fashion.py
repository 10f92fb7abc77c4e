"""Import a catalogue in the layout of Kaggle's "Fashion Product Images" dataset into pv2tea's row format.

The layout (the full download, 44K products, and its smaller copies)::

    ROOT/styles.csv            id, gender, masterCategory, subCategory, articleType, baseColour, ..., productDisplayName
    ROOT/styles/<id>.json      {"data": {"productDisplayName", "baseColour", "articleAttributes": {name: value},
                                "productDescriptors": {kind: {"value": HTML}}, "articleType": {"typeName"}, ...}}
    ROOT/images/<id>.jpg       the product photo

Each product gives one row per attribute it has a value for: the retailer's ``baseColour`` (as ``Base Colour``) and
every ``articleAttributes`` entry (``"NA"`` or empty means absent). The row's ``gold`` is the retailer's value, its
``category`` the article type, its ``images`` the photo, its ``text`` the title (``text="title"``) or the title and the
descriptions with their HTML stripped (``text="full"``), and its ``source`` is ``text`` where the value occurs in
that text by the project's normalization (:func:`pv2tea.eval.normalize.occurs_in`), else ``image``. Rows carry no
``label``: weak labels come from a text extractor (``pv2tea bench catalog`` or ``pv2tea weak-label``).

Without ``styles/`` the importer reads ``styles.csv`` alone (only ``baseColour`` there). The products are read twice,
one at a time (a first pass counts each attribute's values so that rare values can be dropped), so memory holds the
counts, never the catalogue. A product whose JSON cannot be read or whose photo is missing is a counted skip, listed
with its file in the manifest written next to the output (``<out>.manifest.json``).
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Literal

from pv2tea.data.readers import write_records
from pv2tea.data.schema import RowError
from pv2tea.eval.normalize import occurs_in

__all__ = [
    "COLOUR_ATTRIBUTE",
    "DEFAULT_ATTRIBUTES",
    "TEXT_SETTINGS",
    "FashionImportConfig",
    "html_to_text",
    "import_fashion_product_images",
    "manifest_path",
]

COLOUR_ATTRIBUTE = "Base Colour"  # the name the retailer's ``baseColour`` is imported under
# The attributes imported by default: the colour and the article attributes with a value a photo or a text can show,
# present on at least ~150 products of the 9.6K-product copy (measurement-like keys such as "Body or Garment Size",
# "Wash Care" or "Warranty" are left out). ``attributes=None`` imports every attribute.
DEFAULT_ATTRIBUTES: tuple[str, ...] = (
    COLOUR_ATTRIBUTE,
    "Pattern",
    "Sleeve Length",
    "Neck",
    "Fit",
    "Fabric",
    "Collar",
    "Length",
    "Toe Shape",
    "Occasion",
    "Type",
)
TEXT_SETTINGS = ("full", "title")
_ABSENT = {"", "na", "n/a", "none", "null"}
_BLOCK_TAGS = {"br", "p", "li", "div", "ul", "ol", "tr", "h1", "h2", "h3", "h4", "h5", "h6"}


class _TextOnly(HTMLParser):
    """Collects an HTML fragment's text; block tags become sentence breaks. Entities are decoded by the parser."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCK_TAGS:
            self.parts.append(". ")

    def handle_endtag(self, tag: str) -> None:
        if tag in _BLOCK_TAGS:
            self.parts.append(". ")

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def html_to_text(fragment: str) -> str:
    """The text of an HTML fragment, block tags as ``". "`` breaks, whitespace and repeated breaks collapsed."""
    parser = _TextOnly()
    parser.feed(fragment)
    parser.close()
    text = " ".join("".join(parser.parts).split())
    text = re.sub(r"(?:\s*\.\s*){2,}", ". ", text)  # runs of breaks (and a break after a full stop) become one
    return text.strip(" .")


@dataclass(frozen=True)
class FashionImportConfig:
    root: Path  # the folder holding styles.csv, styles/ and images/
    out: Path  # the output data file (.jsonl, .csv or .parquet)
    attributes: tuple[str, ...] | None = DEFAULT_ATTRIBUTES  # None: every attribute
    text: Literal["full", "title"] = "full"
    min_products: int = 20  # a value held by fewer products of the attribute is dropped (a counted skip)
    limit: int | None = None  # read only the first N products (by id): a quick look at a large download

    def __post_init__(self) -> None:
        if self.text not in TEXT_SETTINGS:
            raise ValueError(f"text must be one of {', '.join(TEXT_SETTINGS)}, got {self.text!r}")
        if self.min_products < 1:
            raise ValueError(f"min_products must be >= 1, got {self.min_products}")


@dataclass(frozen=True)
class _Product:
    id: str
    title: str
    description: str
    category: str
    values: dict[str, str]  # attribute -> value
    image: Path


def manifest_path(out: Path) -> Path:
    """Where the importer writes its manifest for the output file ``out``."""
    return out.with_name(out.name + ".manifest.json")


def _product_ids(root: Path) -> tuple[list[str], str]:
    """The product ids (numeric order) and where they come from: ``styles/`` if present, else ``styles.csv``."""
    styles = root / "styles"
    if styles.is_dir():
        ids = [p.stem for p in styles.glob("*.json")]
        return sorted(ids, key=lambda i: (len(i), i)), "json"
    table = root / "styles.csv"
    if not table.is_file():
        raise FileNotFoundError(f"{root}: neither styles/ nor styles.csv found (not a Fashion Product Images folder)")
    return [row["id"] for row in _csv_rows(table)[0]], "csv"


def _csv_rows(path: Path) -> tuple[list[dict[str, str]], list[RowError]]:
    """The rows of styles.csv; a row with more cells than the header (an unquoted comma in the name, as in the
    Kaggle file) keeps its extra cells in the name; a row with too few cells is an error."""
    rows: list[dict[str, str]] = []
    errors: list[RowError] = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header or "id" not in header:
            raise ValueError(f"{path}: no header with an 'id' column")
        for row, cells in enumerate(reader, start=1):
            if len(cells) < len(header):
                errors.append(RowError(str(path), row, "row", f"{len(cells)} cells, the header has {len(header)}"))
                continue
            if len(cells) > len(header):  # the last column (the name) held commas
                cells = [*cells[: len(header) - 1], ",".join(cells[len(header) - 1 :])]
            rows.append(dict(zip(header, cells)))
    return rows, errors


def _type_name(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if isinstance(value, dict):
        value = value.get("typeName")
    return str(value).strip() if value is not None else ""


def _from_json(root: Path, product_id: str) -> _Product | RowError:
    path = root / "styles" / f"{product_id}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))["data"]
        if not isinstance(data, dict):
            raise TypeError("'data' is not an object")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        return RowError(str(path), 1, "data", f"not a readable style JSON ({type(exc).__name__}: {exc})")
    values: dict[str, str] = {}
    if data.get("baseColour") is not None:
        values[COLOUR_ATTRIBUTE] = str(data["baseColour"])
    attributes = data.get("articleAttributes") or {}
    if isinstance(attributes, dict):
        values.update({str(k).strip(): str(v) for k, v in attributes.items() if v is not None})
    descriptors = data.get("productDescriptors") or {}
    description = ""
    if isinstance(descriptors, dict):
        parts = [d.get("value") for d in descriptors.values() if isinstance(d, dict)]
        description = ". ".join(t for t in (html_to_text(p) for p in parts if isinstance(p, str)) if t)
    return _Product(
        id=product_id,
        title=" ".join(str(data.get("productDisplayName") or "").split()),
        description=description,
        category=_type_name(data, "articleType"),
        values=values,
        image=root / "images" / f"{product_id}.jpg",
    )


def _from_csv(root: Path, row: dict[str, str]) -> _Product:
    return _Product(
        id=row["id"].strip(),
        title=" ".join(row.get("productDisplayName", "").split()),
        description="",
        category=row.get("articleType", "").strip(),
        values={COLOUR_ATTRIBUTE: row.get("baseColour", "")},
        image=root / "images" / f"{row['id'].strip()}.jpg",
    )


def _products(cfg: FashionImportConfig, errors: list[RowError]) -> Iterator[_Product]:
    """Every readable product with its photo, in id order; the rest are appended to ``errors``."""
    root = Path(cfg.root)
    ids, kind = _product_ids(root)
    if kind == "json":
        source: Iterator[_Product | RowError] = (_from_json(root, i) for i in ids[: cfg.limit])
    else:
        rows, bad = _csv_rows(root / "styles.csv")
        errors.extend(bad)
        source = (_from_csv(root, r) for r in rows[: cfg.limit])
    for item in source:
        if isinstance(item, RowError):
            errors.append(item)
        elif not item.title:
            errors.append(RowError(str(root / "styles" / f"{item.id}.json"), 1, "productDisplayName", "empty title"))
        elif not item.category:
            errors.append(RowError(str(root / "styles" / f"{item.id}.json"), 1, "articleType", "no article type"))
        elif not item.image.is_file():
            errors.append(RowError(str(item.image), 1, "images", "photo not found"))
        else:
            yield item


def _kept(product: _Product, attributes: Sequence[str] | None) -> dict[str, str]:
    out = {}
    for attribute, value in product.values.items():
        value = " ".join(value.split())
        if value.casefold() in _ABSENT or (attributes is not None and attribute not in attributes):
            continue
        out[attribute] = value
    return out


def _slug(value: str) -> str:
    return re.sub(r"[^0-9a-z]+", "-", value.casefold()).strip("-") or "attr"


def import_fashion_product_images(cfg: FashionImportConfig) -> dict[str, Any]:
    """Import the catalogue under ``cfg.root`` into ``cfg.out``; writes the manifest next to it and returns it.

    Raises:
        FileNotFoundError: if the folder has neither ``styles/`` nor ``styles.csv``.
        ValueError: if no row is left to write (every product skipped, or no attribute kept).
    """
    root, out = Path(cfg.root), Path(cfg.out)
    # pass 1: each attribute's values, counted over the readable products
    count_errors: list[RowError] = []
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for product in _products(cfg, count_errors):
        for attribute, value in _kept(product, cfg.attributes).items():
            counts[attribute][value] += 1
    allowed = {a: {v for v, n in c.items() if n >= cfg.min_products} for a, c in counts.items()}

    # pass 2: the rows, streamed to the writer
    errors: list[RowError] = []
    stats: dict[str, Counter[str]] = defaultdict(Counter)
    rare: Counter[str] = Counter()
    products_written = 0

    def rows() -> Iterator[dict[str, Any]]:
        nonlocal products_written
        for product in _products(cfg, errors):
            text = (
                product.title
                if cfg.text == "title" or not product.description
                else (f"{product.title}. {product.description}")
            )
            wrote = False
            for attribute, value in _kept(product, cfg.attributes).items():
                if value not in allowed[attribute]:
                    rare[attribute] += 1
                    continue
                source = "text" if occurs_in(value, text) else "image"
                stats[attribute][source] += 1
                wrote = True
                yield {
                    "id": f"{product.id}-{_slug(attribute)}",
                    "text": text,
                    "images": [str(product.image.resolve())],
                    "category": product.category,
                    "attribute": attribute,
                    "gold": [value],
                    "source": source,
                }
            products_written += wrote

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial" + out.suffix)
    written = write_records(rows(), tmp)
    n_rows = sum(sum(s.values()) for s in stats.values())
    if not n_rows:
        written.unlink(missing_ok=True)
        raise ValueError(
            f"{root}: no row to write ({len(errors)} product(s) skipped; attributes asked: "
            f"{', '.join(cfg.attributes) if cfg.attributes else 'all'}; min_products={cfg.min_products})"
        )
    written.replace(out)
    missing = sorted(set(cfg.attributes or ()) - set(counts))
    manifest: dict[str, Any] = {
        "root": str(root.resolve()),
        "out": str(out.resolve()),
        "text": cfg.text,
        "min_products": cfg.min_products,
        "products": products_written,
        "rows": n_rows,
        "attributes": {
            a: {
                "rows": sum(stats[a].values()),
                "text": stats[a]["text"],
                "image": stats[a]["image"],
                "values": sorted(allowed[a]),
                "rare_value_rows": rare[a],
            }
            # every attribute found, one whose values are all rare too (its dropped rows counted, its rows 0)
            for a in sorted(counts, key=lambda a: -sum(stats[a].values()))
        },
        "attributes_not_found": missing,
        "n_skipped": len(errors),
        "skipped": [{"file": e.file, "row": e.row, "field": e.field, "message": e.message} for e in errors[:1000]],
    }
    manifest_path(out).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest
