"""Synthetic demo catalog for PV2TEA (ACL Findings 2023) with weak labels from a text rule.

Each product is drawn with PIL: a category silhouette (mug, t-shirt, pillow, vase, rug)
painted in 1-3 named colors (horizontal bands; ``color`` is multi-value) with a pattern
overlay (``pattern``: solid, striped, polka dot, checkered). The paper's challenges are
built in:

* C2 visual bias: light textured backgrounds and 1-3 distractor shapes in colors the
  product does not have.
* C3 textual bias: the text states an attribute's value (~50%), omits it (~35%), or uses
  a color / pattern word in another sense (~15%, e.g. "Green Tea Infused" on a white mug).

Weak labels come from ``text_rule_extract``, a text-only extractor that returns the value
words found in the text or, failing that, the category's most frequent value. Gold labels
are the drawn values; ``source`` is ``"text"`` when every gold value is stated literally
in the text, else ``"image"`` (the paper's source-aware split, §2.2).
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from os import PathLike
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFilter

from pv2tea.data.readers import write_records
from pv2tea.data.schema import Record

__all__ = [
    "ATTRIBUTES",
    "CATEGORIES",
    "COLORS",
    "MULTI_VALUE_ATTRIBUTES",
    "PATTERNS",
    "SPLIT_NAMES",
    "Product",
    "default_priors",
    "default_vocab",
    "make_catalog",
    "make_product",
    "mentioned_values",
    "product_records",
    "render_product",
    "text_rule_extract",
    "weak_label_accuracy",
]

RGB = tuple[int, int, int]
Box = tuple[float, float, float, float]  # left, top, right, bottom
Point = tuple[float, float]

# Named colors, far apart in RGB so that each is recognisable in a small image.
COLORS: dict[str, RGB] = {
    "red": (215, 30, 35),
    "blue": (35, 70, 215),
    "green": (30, 150, 55),
    "yellow": (245, 215, 35),
    "black": (20, 20, 20),
    "white": (250, 250, 250),
    "orange": (245, 130, 20),
    "purple": (125, 40, 165),
    "pink": (245, 135, 195),
    "brown": (115, 65, 25),
}
PATTERNS: tuple[str, ...] = ("solid", "striped", "polka dot", "checkered")
CATEGORIES: tuple[str, ...] = ("mug", "t-shirt", "pillow", "vase", "rug")
ATTRIBUTES: tuple[str, ...] = ("color", "pattern")
# Attributes whose rule extraction keeps every value found rather than the first.
MULTI_VALUE_ATTRIBUTES: frozenset[str] = frozenset({"color"})
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")

# Probability of 1, 2 or 3 colors per product.
_N_COLORS_WEIGHTS = (0.65, 0.25, 0.10)
# How the text treats an attribute value: stated, omitted, or a misleading word.
_TEXT_MODES = ("stated", "omitted", "misleading")
_TEXT_MODE_WEIGHTS = (0.50, 0.35, 0.15)
# Chance that a text stating the value also carries a misleading word.
_STATED_ALSO_MISLEADING = 0.10
# Sampling weights of a category's favored values (most frequent first); others weigh 1.
_FAVORED_COLOR_WEIGHTS = (7.0, 4.0, 2.0)
_FAVORED_PATTERN_WEIGHTS = (4.0, 2.0)
_OUTLINE: RGB = (60, 60, 60)


@dataclass(frozen=True)
class _CategoryStyle:
    """Value distribution and wording of one category."""

    favored_colors: tuple[str, ...]  # most frequent first; the first is the text prior
    favored_patterns: tuple[str, ...]  # most frequent first; the first is the text prior
    nouns: tuple[str, ...]  # product names used in titles
    bullets: tuple[str, ...]  # feature bullets free of color and pattern words
    room: str  # where the product is used, for descriptions


_STYLES: dict[str, _CategoryStyle] = {
    "mug": _CategoryStyle(
        ("white", "black", "blue"),
        ("solid", "polka dot"),
        ("Coffee Mug", "Ceramic Mug", "Tea Mug"),
        (
            "Dishwasher and microwave safe",
            "Holds 12 oz of coffee or tea",
            "Comfortable C-shaped handle",
            "Lead-free ceramic",
        ),
        "kitchen",
    ),
    "t-shirt": _CategoryStyle(
        ("black", "white", "red"),
        ("solid", "striped"),
        ("T-Shirt", "Crew Neck Tee", "Cotton Tee Shirt"),
        (
            "100% combed cotton",
            "Machine wash cold, tumble dry low",
            "Classic crew neck fit",
            "Tagless for all-day comfort",
        ),
        "wardrobe",
    ),
    "pillow": _CategoryStyle(
        ("yellow", "pink", "purple"),
        ("checkered", "polka dot"),
        ("Throw Pillow", "Cushion Cover", "Decorative Pillow"),
        ("Hidden zipper closure", "18 x 18 inch insert included", "Soft polyester fill", "Spot clean only"),
        "living room",
    ),
    "vase": _CategoryStyle(
        ("blue", "green", "white"),
        ("solid", "striped"),
        ("Flower Vase", "Ceramic Vase", "Bud Vase"),
        (
            "Watertight glazed interior",
            "Stands 10 inches tall",
            "Perfect for fresh or dried flowers",
            "Handmade by artisans",
        ),
        "shelf",
    ),
    "rug": _CategoryStyle(
        ("brown", "red", "orange"),
        ("striped", "checkered"),
        ("Area Rug", "Runner Rug", "Entry Rug"),
        ("Non-slip backing", "Low pile, easy to vacuum", "Measures 5 x 7 feet", "Fade-resistant fibers"),
        "hallway",
    ),
}

_BRANDS = ("Homely", "Urbano", "Cozy Nest", "Nordic Lane", "Sunhaus", "Pinecrest", "Everyday Basics")
_OCCASIONS = ("birthdays", "housewarmings", "the holidays", "a new home")
_DESCRIPTIONS = (
    "A thoughtful gift for {occasion}.",
    "Designed to brighten any {room}.",
    "Our {noun} brings everyday comfort and style to your {room}.",
    "Made to last and easy to love, great for {occasion}.",
)
# Phrases that use a color word in a non-color sense.
_MISLEADING_COLOR: dict[str, tuple[str, ...]] = {
    "red": ("Red Carpet Collection", "Red Hot Bestseller"),
    "blue": ("Blue Ribbon Quality", "Once in a Blue Moon Gift"),
    "green": ("Green Tea Infused", "Green Living Eco Gift"),
    "yellow": ("Yellow Jacket Team Fan Gift", "Yellow Pages Featured Seller"),
    "black": ("Black Friday Deal", "Black Tie Gala Gift"),
    "white": ("White Elephant Gift", "White Glove Delivery"),
    "orange": ("Orange Blossom Scented", "Orange County Souvenir"),
    "purple": ("Purple Heart Veteran Gift", "Purple Rain Tribute"),
    "pink": ("Pink Floyd Fan Gift", "Tickled Pink Gift Idea"),
    "brown": ("Brown Sugar Scented", "Brown University Alumni Gift"),
}
# Phrases that use a pattern word in a non-pattern sense.
_MISLEADING_PATTERN: dict[str, tuple[str, ...]] = {
    "solid": ("Solid Oak Gift Box Included", "Rock Solid Guarantee"),
    "striped": ("Striped Bass Fishing Gift",),
    "polka dot": ("Polka Dot Party Favor",),
    "checkered": ("Checkered Flag Racing Fan Gift", "Checkered Past Novelty Gift"),
}


@dataclass(frozen=True)
class Product:
    """One synthetic product: its true attribute values and its text."""

    id: str  # e.g. "p00012"
    category: str
    colors: tuple[str, ...]  # drawn top to bottom
    pattern: str
    text: str


def default_vocab() -> dict[str, list[str]]:
    """Values of each attribute of the synthetic catalog."""
    return {"color": list(COLORS), "pattern": list(PATTERNS)}


def default_priors() -> dict[str, dict[str, str]]:
    """The most frequent value of each attribute per category (the rule's fallback)."""
    return {
        category: {"color": style.favored_colors[0], "pattern": style.favored_patterns[0]}
        for category, style in _STYLES.items()
    }


@cache
def _value_pattern(value: str) -> re.Pattern[str]:
    """Case-insensitive whole-word matcher of ``value`` (spaces also match hyphens)."""
    words = r"[\s\-]+".join(re.escape(word) for word in value.split())
    return re.compile(rf"(?<![^\W\d_]){words}(?![^\W\d_])", re.IGNORECASE)


def mentioned_values(text: str, values: Iterable[str]) -> list[str]:
    """The ``values`` occurring as whole words in ``text``, in order of first appearance."""
    positions = {}
    for value in values:
        match = _value_pattern(value).search(text)
        if match is not None:
            positions[value] = match.start()
    return sorted(positions, key=positions.__getitem__)


def text_rule_extract(
    text: str,
    attribute: str,
    category: str,
    vocab: Mapping[str, Sequence[str]],
    priors: Mapping[str, Mapping[str, str]],
    *,
    multi_value_attributes: Collection[str] = MULTI_VALUE_ATTRIBUTES,
) -> list[str]:
    """A text-only extractor: value words found in ``text``, else the category prior.

    For a multi-value attribute every distinct value word is returned in order of first
    appearance; otherwise only the first. Without a match, the category's most frequent
    value is returned (empty list if ``priors`` has none).
    """
    found = mentioned_values(text, vocab.get(attribute, ()))
    if found:
        return found if attribute in multi_value_attributes else found[:1]
    prior = priors.get(category, {}).get(attribute)
    return [prior] if prior else []


def weak_label_accuracy(records: Iterable[Record]) -> dict[str, dict[str, Any]]:
    """Exact-match accuracy of weak labels against gold, overall and per gold source.

    Labels match when they hold the same set of values (case-insensitive). Records
    without gold are ignored. Returns ``{"overall"|"text"|"image": {"n", "accuracy"}}``;
    the accuracy of an empty group is None.
    """
    totals: Counter[str] = Counter()
    correct: Counter[str] = Counter()
    for record in records:
        if record.gold is None:
            continue
        hit = {v.casefold() for v in record.label} == {v.casefold() for v in record.gold}
        for group in ("overall", record.source):
            if group is not None:
                totals[group] += 1
                correct[group] += hit
    return {
        group: {
            "n": totals[group],
            "accuracy": correct[group] / totals[group] if totals[group] else None,
        }
        for group in ("overall", "text", "image")
    }


def _weighted_sample(rng: random.Random, weights: Mapping[str, float], k: int) -> list[str]:
    """``k`` distinct keys of ``weights`` drawn without replacement."""
    pool = dict(weights)
    chosen: list[str] = []
    for _ in range(k):
        value = rng.choices(list(pool), weights=list(pool.values()))[0]
        chosen.append(value)
        del pool[value]
    return chosen


def _value_weights(values: Sequence[str], favored: Sequence[str], boosts: Sequence[float]) -> dict[str, float]:
    """Sampling weight 1 for every value, ``boosts`` for the ``favored`` ones."""
    weights = dict.fromkeys(values, 1.0)
    weights.update(zip(favored, boosts))
    return weights


def _join_words(words: Sequence[str]) -> str:
    """Join words as 'A', 'A and B' or 'A, B and C'."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


@dataclass
class _TextParts:
    """Pieces of a product text, filled attribute by attribute."""

    title_terms: list[str]  # words placed before the product noun
    title_tail: list[str]  # phrases appended to the title
    bullets: list[str]
    sentences: list[str]  # description sentences


def _add_stated(parts: _TextParts, attribute: str, phrase: str, rng: random.Random) -> None:
    """State an attribute value in the title, a bullet or the description."""
    place = rng.choice(("title", "bullet", "description"))
    if place == "title":
        parts.title_terms.append(phrase)
    elif place == "bullet":
        parts.bullets.append(f"{attribute.capitalize()}: {phrase}")
    elif attribute == "color":
        parts.sentences.append(f"Available in {phrase.lower()}.")
    else:
        parts.sentences.append(f"Features a {phrase.lower()} design.")


def _add_misleading(
    parts: _TextParts,
    phrases: Mapping[str, Sequence[str]],
    truth: Collection[str],
    rng: random.Random,
) -> None:
    """Add a phrase using a value word (not among ``truth``) in another sense."""
    word = rng.choice(sorted(set(phrases) - set(truth)))
    phrase = rng.choice(phrases[word])
    if rng.random() < 0.5:
        parts.title_tail.append(phrase)
    else:
        parts.bullets.append(phrase)


def _compose_text(category: str, colors: Sequence[str], pattern: str, rng: random.Random) -> str:
    """Title, bullets and description of a product, with C3-style value mentions."""
    style = _STYLES[category]
    noun = rng.choice(style.nouns)
    parts = _TextParts([], [], rng.sample(style.bullets, 2), [])
    attributes = [
        ("color", _join_words([c.title() for c in colors]), colors, _MISLEADING_COLOR),
        ("pattern", pattern.title(), (pattern,), _MISLEADING_PATTERN),
    ]
    rng.shuffle(attributes)
    for attribute, phrase, truth, misleading in attributes:
        mode = rng.choices(_TEXT_MODES, weights=_TEXT_MODE_WEIGHTS)[0]
        if mode == "stated":
            _add_stated(parts, attribute, phrase, rng)
        if mode == "misleading" or (mode == "stated" and rng.random() < _STATED_ALSO_MISLEADING):
            _add_misleading(parts, misleading, truth, rng)
    rng.shuffle(parts.bullets)
    title = " ".join([rng.choice(_BRANDS), *parts.title_terms, noun])
    if parts.title_tail:
        title += " - " + ", ".join(parts.title_tail)
    description = rng.choice(_DESCRIPTIONS).format(occasion=rng.choice(_OCCASIONS), room=style.room, noun=noun.lower())
    bullets = [f"- {bullet}" for bullet in parts.bullets]
    return "\n".join([title, *bullets, " ".join([description, *parts.sentences])])


def make_product(index: int, seed: int) -> Product:
    """Sample product ``index`` of the catalog with ``seed`` (independent of catalog size)."""
    rng = random.Random(f"pv2tea-synth:{seed}:{index}:spec")
    category = rng.choice(CATEGORIES)
    style = _STYLES[category]
    n_colors = rng.choices((1, 2, 3), weights=_N_COLORS_WEIGHTS)[0]
    color_weights = _value_weights(list(COLORS), style.favored_colors, _FAVORED_COLOR_WEIGHTS)
    pattern_weights = _value_weights(PATTERNS, style.favored_patterns, _FAVORED_PATTERN_WEIGHTS)
    colors = _weighted_sample(rng, color_weights, n_colors)
    pattern = _weighted_sample(rng, pattern_weights, 1)[0]
    text = _compose_text(category, colors, pattern, rng)
    return Product(f"p{index:05d}", category, tuple(colors), pattern, text)


def _polygon(box: Box, points: Sequence[Point]) -> list[Point]:
    """Map unit-square points into ``box``."""
    x0, y0, x1, y1 = box
    return [(x0 + u * (x1 - x0), y0 + v * (y1 - y0)) for u, v in points]


# Silhouette outlines in unit-square coordinates.
_TSHIRT = (
    (0.30, 0.05),
    (0.40, 0.05),
    (0.50, 0.14),
    (0.60, 0.05),
    (0.70, 0.05),
    (1.0, 0.27),
    (0.88, 0.44),
    (0.78, 0.37),
    (0.78, 1.0),
    (0.22, 1.0),
    (0.22, 0.37),
    (0.12, 0.44),
    (0.0, 0.27),
)
_PILLOW = (
    (0.0, 0.08),
    (0.5, 0.18),
    (1.0, 0.08),
    (0.9, 0.5),
    (1.0, 0.92),
    (0.5, 0.82),
    (0.0, 0.92),
    (0.1, 0.5),
)
_VASE_RIGHT = ((0.62, 0.0), (0.57, 0.07), (0.57, 0.25), (0.86, 0.5), (0.84, 0.72), (0.70, 1.0))
_VASE = _VASE_RIGHT + tuple((1.0 - u, v) for u, v in reversed(_VASE_RIGHT))


def _silhouette(category: str, size: int, box: Box) -> Image.Image:
    """Binary mask (mode L) of the category's shape inside ``box``."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    width = box[2] - box[0]
    if category == "mug":
        body = _polygon(box, ((0.05, 0.12), (0.72, 0.98)))
        draw.rounded_rectangle(body, radius=width * 0.06, fill=255)
        handle = _polygon(box, ((0.52, 0.30), (0.98, 0.78)))
        draw.ellipse(handle, outline=255, width=max(2, round(width * 0.1)))
    elif category == "t-shirt":
        draw.polygon(_polygon(box, _TSHIRT), fill=255)
    elif category == "pillow":
        draw.polygon(_polygon(box, _PILLOW), fill=255)
    elif category == "vase":
        draw.polygon(_polygon(box, _VASE), fill=255)
    else:  # rug: a wide rectangle with fringes on both short sides
        draw.rectangle(_polygon(box, ((0.1, 0.28), (0.9, 0.72))), fill=255)
        for step in range(9):
            v = 0.31 + step * 0.05
            draw.line(_polygon(box, ((0.02, v), (0.1, v))), fill=255)
            draw.line(_polygon(box, ((0.9, v), (0.98, v))), fill=255)
    return mask


def _shade(color: RGB) -> RGB:
    """A darker (or, for dark colors, lighter) tone of the same color for pattern marks."""
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    red, green, blue = color
    if luminance < 70:
        return (round(red + 0.4 * (255 - red)), round(green + 0.4 * (255 - green)), round(blue + 0.4 * (255 - blue)))
    factor = 0.8 if luminance > 200 else 0.65  # keep marks on white / yellow light
    return (round(factor * red), round(factor * green), round(factor * blue))


def _pattern_mask(pattern: str, size: int, rng: random.Random) -> Image.Image:
    """Where pattern marks go (mode L): stripes, dots, checks, or nothing."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    period = max(6, size // rng.choice((8, 9, 10)))
    offset = rng.randrange(period)
    if pattern == "striped":
        for x in range(offset - period, size, period):
            draw.rectangle((x, 0, x + period // 3, size), fill=255)
    elif pattern == "polka dot":
        radius = max(2, period // 4)
        for row, y in enumerate(range(offset - period, size + period, period)):
            shift = period // 2 if row % 2 else 0
            for x in range(offset - period + shift, size + period, period):
                draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
    elif pattern == "checkered":
        cell = max(3, period // 2)
        for row, y in enumerate(range(-cell + offset % cell, size, cell)):
            for col, x in enumerate(range(-cell + offset % cell, size, cell)):
                if (row + col) % 2:
                    draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=255)
    return mask


def _background(size: int, rng: random.Random) -> Image.Image:
    """A light, randomly tinted canvas with faint strokes (C2 clutter)."""
    level = rng.randint(205, 238)
    base = tuple(min(255, level + rng.randint(-12, 12)) for _ in range(3))
    canvas = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(canvas)
    for _ in range(30):
        tone = tuple(max(0, min(255, c + rng.randint(-28, 12))) for c in base)
        start = (rng.randrange(size), rng.randrange(size))
        reach = size // 3
        end = (start[0] + rng.randint(-reach, reach), start[1] + rng.randint(-reach, reach))
        draw.line((start, end), fill=tone, width=rng.randint(1, 3))
    return canvas


def _draw_distractors(canvas: Image.Image, avoid: Collection[str], rng: random.Random) -> None:
    """Draw 1-3 small shapes in colors not in ``avoid`` (C2 distractors)."""
    size = canvas.size[0]
    draw = ImageDraw.Draw(canvas)
    palette = [name for name in COLORS if name not in avoid]
    for _ in range(rng.randint(1, 3)):
        color = COLORS[rng.choice(palette)]
        radius = rng.randint(size // 18, size // 10)
        cx, cy = rng.randint(radius, size - radius), rng.randint(radius, size - radius)
        left, top, right, bottom = cx - radius, cy - radius, cx + radius, cy + radius
        shape = rng.choice(("circle", "square", "triangle", "diamond"))
        if shape == "circle":
            draw.ellipse((left, top, right, bottom), fill=color)
        elif shape == "square":
            draw.rectangle((left, top, right, bottom), fill=color)
        elif shape == "triangle":
            draw.polygon([(cx, top), (right, bottom), (left, bottom)], fill=color)
        else:
            draw.polygon([(cx, top), (right, cy), (cx, bottom), (left, cy)], fill=color)


def render_product(product: Product, size: int, seed: int) -> Image.Image:
    """Draw ``product`` on a cluttered background as a ``size`` x ``size`` RGB image."""
    rng = random.Random(f"pv2tea-synth:{seed}:{product.id}:image")
    canvas = _background(size, rng)
    _draw_distractors(canvas, product.colors, rng)
    extent = rng.uniform(0.58, 0.72) * size
    cx = size / 2 + rng.uniform(-0.07, 0.07) * size
    cy = size / 2 + rng.uniform(-0.07, 0.07) * size
    box = (cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2)
    mask = _silhouette(product.category, size, box)

    bbox = mask.getbbox()
    if bbox is None:
        raise RuntimeError(f"the {product.category} silhouette of {box} is empty")
    top, bottom = bbox[1], bbox[3]
    fill = Image.new("RGB", (size, size))
    shade = Image.new("RGB", (size, size))
    fill_draw, shade_draw = ImageDraw.Draw(fill), ImageDraw.Draw(shade)
    n_bands = len(product.colors)
    for band, name in enumerate(product.colors):
        y0 = top + (bottom - top) * band // n_bands
        y1 = top + (bottom - top) * (band + 1) // n_bands
        fill_draw.rectangle((0, y0, size, y1), fill=COLORS[name])
        shade_draw.rectangle((0, y0, size, y1), fill=_shade(COLORS[name]))
    painted = Image.composite(shade, fill, _pattern_mask(product.pattern, size, rng))

    canvas.paste(_OUTLINE, mask=mask.filter(ImageFilter.MaxFilter(3)))
    canvas.paste(painted, mask=mask)
    return canvas


def product_records(
    product: Product,
    images: Sequence[str],
    vocab: Mapping[str, Sequence[str]],
    priors: Mapping[str, Mapping[str, str]],
) -> list[Record]:
    """One record per attribute: weak label from the text rule, gold from the drawing."""
    records = []
    for attribute, gold in (("color", product.colors), ("pattern", (product.pattern,))):
        stated = set(mentioned_values(product.text, gold))
        label = text_rule_extract(product.text, attribute, product.category, vocab, priors)
        records.append(
            Record(
                id=f"{product.id}-{attribute}",
                text=product.text,
                images=tuple(images),
                category=product.category,
                attribute=attribute,
                label=tuple(label),
                gold=tuple(gold),
                source="text" if stated == set(gold) else "image",
            )
        )
    return records


def _split_sizes(n: int, fractions: Sequence[float]) -> list[int]:
    """Products per split; the last split takes the rounding remainder."""
    valid = len(fractions) == len(SPLIT_NAMES) and all(f >= 0 for f in fractions)
    if not valid or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(
            f"splits must be {len(SPLIT_NAMES)} non-negative fractions summing to 1, got {tuple(fractions)}"
        )
    sizes = [round(n * f) for f in fractions[:-1]]
    sizes[-1] = min(sizes[-1], n - sum(sizes[:-1]))
    return [*sizes, n - sum(sizes)]


def make_catalog(
    out_dir: str | PathLike[str],
    *,
    n_products: int = 600,
    seed: int = 0,
    image_size: int = 112,
    splits: tuple[float, float, float] = (0.7, 0.15, 0.15),
) -> dict[str, Path]:
    """Write a synthetic catalog: ``images/*.png``, ``{train,val,test}.jsonl``, ``catalog.json``.

    Every product gives one row per attribute (weak ``label``, ``gold``, ``source``), and
    both rows of a product go to the same split. Output is byte-identical for a given
    seed. Returns the path of each split file.
    """
    if n_products < 1:
        raise ValueError(f"n_products must be >= 1, got {n_products}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    sizes = _split_sizes(n_products, splits)
    root = Path(out_dir)
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    vocab, priors = default_vocab(), default_priors()

    per_product: list[list[Record]] = []
    categories: Counter[str] = Counter()
    for index in range(n_products):
        product = make_product(index, seed)
        image_path = image_dir / f"{product.id}.png"
        render_product(product, image_size, seed).save(image_path, format="PNG")
        per_product.append(product_records(product, [os.path.abspath(image_path)], vocab, priors))
        categories[product.category] += 1

    order = list(range(n_products))
    random.Random(f"pv2tea-synth:{seed}:split").shuffle(order)
    paths: dict[str, Path] = {}
    split_counts: dict[str, dict[str, int]] = {}
    start = 0
    for name, size in zip(SPLIT_NAMES, sizes):
        chosen = sorted(order[start : start + size])
        start += size
        rows = [record for index in chosen for record in per_product[index]]
        paths[name] = write_records(rows, root / f"{name}.jsonl")
        split_counts[name] = {"products": size, "rows": len(rows)}

    records = [record for rows in per_product for record in rows]
    stats = {
        "seed": seed,
        "n_products": n_products,
        "n_rows": len(records),
        "image_size": image_size,
        "splits": split_counts,
        "categories": dict(sorted(categories.items())),
        "sources": dict(sorted(Counter(r.source for r in records).items())),
        "multi_value_color_rows": sum(r.attribute == "color" and len(r.gold or ()) > 1 for r in records),
        "vocab": vocab,
        "priors": priors,
        "weak_label_accuracy": {
            "all": weak_label_accuracy(records),
            **{a: weak_label_accuracy(r for r in records if r.attribute == a) for a in ATTRIBUTES},
        },
    }
    (root / "catalog.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    return paths
