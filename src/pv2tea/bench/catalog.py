"""``pv2tea bench catalog``: the weak-label protocol on any gold-labelled multimodal catalogue file.

A catalogue team has products with text, photo, category and gold values (e.g. ``pv2tea data import
fashion-product-images``). The products are split, by a stable hash of the product, into a *text-labelled share*
(``text_share``; the extractor learns from its texts and gold values, its images unused: what the team's extractor
knows) and the *catalogue* (the rest: weakly labelled by that extractor, k-fold over products, the models learn from
weak labels only, scored on gold by source). The closed value list of an attribute is the values of the
text-labelled share. The protocol itself is :func:`pv2tea.bench.protocol.run_protocol`, as for ImplicitAVE.

Writes into ``out``: ``runs/`` (the protocol's runs, resumable), ``bench.json`` (summaries), ``tables.md``, and
``summary.json`` (:func:`catalog_headline`: per variant the mean over attributes of F1, F1 on text and on image rows
and the GAP, per attribute, p-values against the extractor and against ``tea``, seconds and peak memory) and
``report/`` (:mod:`pv2tea.viz.catalog`: the per-attribute, per-source figure and a page of examples where the photo
corrected the extractor or misled the model).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pv2tea.bench.probes import image_features, probe_answers
from pv2tea.bench.protocol import (
    BENCH_OVERRIDES,
    OLD_WARM_START_DIR,
    WARM_START_ROW,
    ProtocolConfig,
    ProtocolRun,
    format_tables,
    run_protocol,
)
from pv2tea.bench.train import peak_rss_gib
from pv2tea.config import load_config
from pv2tea.data.products import split_key
from pv2tea.data.schema import Record
from pv2tea.data.validate import load_dataset

__all__ = ["CatalogBenchConfig", "catalog_headline", "run_catalog_bench", "sample_products", "split_catalog"]

EXTRACTOR = "text_extractor"


@dataclass(kw_only=True)
class CatalogBenchConfig(ProtocolConfig):
    data: Path  # the catalogue file: rows with gold values and images (pv2tea's format)
    out: Path  # benchmark folder (re-run to resume)
    text_share: float = 0.5  # share of the products whose texts and gold train the extractor
    name: str | None = None  # the catalogue's name in tables and logs (default: the file's stem)
    probes: bool = True  # image-only anchors: linear probes on frozen features, on weak labels and on gold
    products: int | None = None  # use a stable random sample of this many products (None: all)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.products is not None and self.products < 2:
            raise ValueError(f"--products must be at least 2, got {self.products}")
        if not 0.0 < self.text_share < 1.0:
            raise ValueError(f"--text-share must be strictly between 0 and 1, got {self.text_share}")


def _in_text_share(key: str, share: float) -> bool:
    """A stable draw per product (the same on every machine and Python): sha256 of its key as a number in [0, 1)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def _stable_keys(records: Sequence[Record]) -> list[str]:
    """Each row's product key as it reads wherever the catalogue is stored: the photo's path relative to the folder
    all photos share (the row id for a product without one)."""
    photos = [r.images[0] for r in records if r.images]
    base = os.path.commonpath(photos) if photos else ""
    if len(set(photos)) == 1:  # one photo: commonpath is the file itself
        base = os.path.dirname(base)
    return [Path(os.path.relpath(r.images[0], base)).as_posix() if r.images else r.id for r in records]


def sample_products(records: Sequence[Record], n: int) -> list[Record]:
    """The rows of ``n`` products drawn by a stable hash of each product (all rows when there are fewer)."""
    keys = _stable_keys(records)
    order = sorted(set(keys), key=lambda k: hashlib.sha256(b"sample:" + k.encode()).digest())
    kept = set(order[:n])
    return [r for r, k in zip(records, keys) if k in kept]


def split_catalog(records: Sequence[Record], share: float) -> tuple[list[Record], list[Record]]:
    """(text-labelled rows, catalogue rows): the first as text-only rows labelled with their gold values, the second
    as they are (no label; the extractor gives it); a product's rows stay together."""
    text_rows, catalogue = [], []
    for r, key in zip(records, _stable_keys(records)):
        if _in_text_share(key, share):
            text_rows.append(replace(r, images=(), label=tuple(r.gold or ()), label_weight=None, label_probs=None))
        else:
            catalogue.append(replace(r, label=(), label_weight=None, label_probs=None))
    return text_rows, catalogue


def _check_rows(records: Sequence[Record], path: Path) -> None:
    missing_gold = next((i for i, r in enumerate(records, 1) if not r.gold), None)
    if missing_gold is not None:
        raise ValueError(
            f"{path}: row {missing_gold} ('{records[missing_gold - 1].id}') has no gold value: "
            "the catalogue protocol scores every row against gold"
        )
    if not any(r.images for r in records):
        raise ValueError(f"{path}: no row has an image; the catalogue protocol compares models that read the photo")


def _candidates(text_rows: Sequence[Record]) -> dict[str, list[str]]:
    values: dict[str, set[str]] = defaultdict(set)
    for r in text_rows:
        values[r.attribute].update(r.label)
    return {a: sorted(v) for a, v in sorted(values.items())}


def run_catalog_bench(cfg: CatalogBenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Split, run the protocol, write ``bench.json``, ``tables.md`` and ``summary.json``; returns the results."""
    start = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    records = load_dataset(cfg.data, require_label=False).records
    if not records:
        raise ValueError(f"{cfg.data}: no rows")
    _check_rows(records, cfg.data)
    if cfg.products is not None:
        records = sample_products(records, cfg.products)
    text_rows, catalogue = split_catalog(records, cfg.text_share)
    if not text_rows or not catalogue:
        raise ValueError(
            f"{cfg.data}: text share {cfg.text_share} leaves {len(text_rows)} text-labelled and {len(catalogue)} "
            "catalogue rows; both need rows (more products, or another --text-share)"
        )
    candidates = _candidates(text_rows)
    label = cfg.name or Path(cfg.data).stem
    log(
        f"{label}: {len(text_rows)} text-labelled rows, {len(catalogue)} catalogue rows "
        f"({len({split_key(r) for r in catalogue})} products), {len(candidates)} attributes"
    )
    anchors = _probe_anchors(catalogue, cfg, log) if cfg.probes else None
    run = run_protocol(label, text_rows, catalogue, candidates, cfg.out / "runs", cfg, log, anchors)
    summaries = run.summaries
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items()}
    results: dict[str, Any] = {
        "domains": {label: summaries},
        "config": config,
        "split": {"text_rows": len(text_rows), "catalogue_rows": len(catalogue), "candidates": candidates},
        "seconds": time.perf_counter() - start,
        "peak_rss_gb": peak_rss_gib(),
        "rows_per_s": training_rates(cfg.out / "runs"),
    }
    (cfg.out / "bench.json").write_text(json.dumps(results, indent=2, allow_nan=False))
    (cfg.out / "tables.md").write_text(format_tables(results) + "\n" + format_source_table(results))
    headline = catalog_headline(results)
    (cfg.out / "summary.json").write_text(json.dumps(headline, indent=2))
    _report(run, cfg, headline["catalog"], label)
    return results


def training_rates(runs: Path) -> dict[str, float]:
    """Training rows per second of wall time by model (the warm start, each variant over its folds and seeds):
    the rows of the finished epochs (steps x ``train.batch_size`` x ``train.grad_accumulation_steps``, as each run's
    ``config.yaml`` says) over their seconds (S3's weights included), from the runs' ``metrics.jsonl``."""
    import yaml

    rows: dict[str, float] = defaultdict(float)
    seconds: dict[str, float] = defaultdict(float)
    for metrics in sorted(runs.glob("**/metrics.jsonl")):
        folder = metrics.parent
        # the warm start (its folder under its old name in older runs), or fold_k/VARIANT/seed_s
        name = WARM_START_ROW if folder.name in (WARM_START_ROW, OLD_WARM_START_DIR) else folder.parent.name
        try:
            train_cfg = (yaml.safe_load((folder / "config.yaml").read_text()) or {}).get("train", {})
            per_step = int(train_cfg.get("batch_size", 1)) * int(train_cfg.get("grad_accumulation_steps", 1))
            epochs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        except (OSError, ValueError, TypeError, AttributeError):
            continue  # a run without a readable record is left out of the rate
        previous = 0
        for e in epochs:
            if e.get("finished") and isinstance(e.get("step"), int) and e.get("seconds"):
                rows[name] += (e["step"] - previous) * per_step
                seconds[name] += float(e["seconds"])
                previous = e["step"]
    return {name: round(rows[name] / seconds[name], 1) for name in sorted(rows) if seconds[name] > 0}


def _report(run: ProtocolRun, cfg: CatalogBenchConfig, headline: dict[str, Any], label: str) -> None:
    """``report/``: the per-attribute, per-source figure and the page of photo examples (PV2TEA against TEA; the
    first seed), when both models ran."""
    from pv2tea.viz.catalog import photo_examples, write_catalog_report  # matplotlib: the `report` extra

    seed = cfg.seeds[0]
    ours, theirs = run.scored.get(("pv2tea", seed)), run.scored.get(("tea", seed))
    examples = photo_examples(run.tests, ours, theirs) if ours and theirs else []
    tables = format_source_table({"domains": {label: run.summaries}})
    write_catalog_report(headline, tables, examples, cfg.out / "report", f"pv2tea bench catalog: {label}")


def _probe_anchors(
    catalogue: Sequence[Record], cfg: CatalogBenchConfig, log: Callable[[str], None]
) -> Callable[[list[Record], list[Record]], dict[str, list[list[str]]]]:
    """The image-only probe rows (:mod:`pv2tea.bench.probes`) on the features of the protocol's visual backbone."""
    vision = load_config(cfg.config, [*BENCH_OVERRIDES, *cfg.overrides]).vision
    paths = sorted({r.images[0] for r in catalogue if r.images})
    log(f"probes: pooled features of {len(paths)} photos ({vision.name}, levels {vision.extra_levels or 'none'})")
    matrix = image_features(paths, vision, cfg.out / "runs" / "probe_features.npz")
    unreadable = [p for p, row in zip(paths, matrix) if not row.any()]
    if unreadable:  # zero features: the probes answer such a row by the training majority, as for no photo
        log(f"probes: {len(unreadable)} photo(s) could not be read, e.g. {unreadable[0]}; answered without features")
        paths = [p for p, row in zip(paths, matrix) if row.any()]
        matrix = matrix[[bool(row.any()) for row in matrix]]
    features = dict(zip(paths, matrix))
    return lambda train, test: probe_answers(train, test, features)


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return round(sum(kept) / len(kept), 2) if kept else None


# an attribute's F1 on the rows of one source counts in the source means (and the GAP) only from this many held-out
# rows of that source per run: on a catalogue whose titles state a value for 1 row in 300, that row's 0 or 100
# would otherwise weigh as much as a whole attribute
MIN_SOURCE_ROWS = 10


def _attribute_scores(summary: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Per attribute: ranked F1 overall and on text / image rows (means over runs, in points; a source with fewer
    than ``MIN_SOURCE_ROWS`` rows per run is None)."""
    block = summary["constrained"]["by_attribute"]

    def by_source(s: dict[str, Any], source: str) -> float | None:
        n = s.get(f"n_{source}")
        return s.get(f"f1_{source}", {}).get("mean") if n is not None and n >= MIN_SOURCE_ROWS else None

    return {
        a: {"f1": s["f1"]["mean"], "f1_text": by_source(s, "text"), "f1_image": by_source(s, "image")}
        for a, s in block.items()
    }


def catalog_headline(results: dict[str, Any]) -> dict[str, Any]:
    """The last printed line: ``{"catalog": {"overall": {VARIANT: {"f1", "f1_text", "f1_image", "gap"}},
    "attributes": {ATTR: {VARIANT: {...}}}, "p": {VARIANT: {"vs_extractor", "vs_tea"}}, "seconds",
    "peak_rss_gb"}}``; overall = the mean over attributes of ranked macro-F1, in points; ``f1_text`` / ``f1_image``
    over the attributes with at least ``MIN_SOURCE_ROWS`` held-out rows of the source per run, and the GAP (their
    difference) over the attributes that have both."""
    (summaries,) = results["domains"].values()
    overall: dict[str, Any] = {}
    attributes: dict[str, dict[str, Any]] = defaultdict(dict)
    p: dict[str, Any] = {}
    for variant, summary in summaries.items():
        per = _attribute_scores(summary)
        for a, scores in per.items():
            attributes[a][variant] = {k: None if v is None else round(v, 2) for k, v in scores.items()}
        both = [s for s in per.values() if s["f1_text"] is not None and s["f1_image"] is not None]
        overall[variant] = {
            "f1": _mean([s["f1"] for s in per.values()]),
            "f1_text": _mean([s["f1_text"] for s in per.values()]),
            "f1_image": _mean([s["f1_image"] for s in per.values()]),
            # over the attributes with enough rows of both sources, so that text and image are the same attributes
            "gap": _mean([s["f1_text"] - s["f1_image"] for s in both]),  # type: ignore[operator]
        }
        p[variant] = {
            "vs_extractor": (summary.get("ttest_vs_text_extractor") or {}).get("p"),
            "vs_tea": (summary.get("ttest_vs_tea") or {}).get("p"),
        }
    return {
        "catalog": {
            "overall": overall,
            "attributes": dict(attributes),
            "p": p,
            "seconds": round(results.get("seconds", 0.0), 1),
            "peak_rss_gb": round(results.get("peak_rss_gb", 0.0), 2),
            "rows_per_s": results.get("rows_per_s", {}),
        }
    }


def format_source_table(results: dict[str, Any]) -> str:
    """Mean over attributes of ranked F1, overall and by source, with the GAP and the p-values."""
    head = catalog_headline(results)["catalog"]
    lines = [
        "Mean over attributes of ranked macro-F1 (each attribute's F1 a mean over runs), by source of the gold value "
        f"(a source counted for an attribute from {MIN_SOURCE_ROWS} held-out rows per run; the GAP over the "
        "attributes with both):",
        "",
        "| variant | F1 | F1 text rows | F1 image rows | GAP | p vs extractor | p vs tea |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]

    def cell(x: float | None) -> str:
        return "–" if x is None else f"{x:.1f}"

    def pcell(x: float | None) -> str:
        return "–" if x is None else f"{x:.3g}"

    for variant, s in head["overall"].items():
        q = head["p"][variant]
        lines.append(
            f"| {variant} | {cell(s['f1'])} | {cell(s['f1_text'])} | {cell(s['f1_image'])} | {cell(s['gap'])} "
            f"| {pcell(q['vs_extractor'])} | {pcell(q['vs_tea'])} |"
        )
    rates = head.get("rows_per_s") or {}
    if rates:
        lines += [
            "",
            f"Training speed, rows per second of wall time (S3 included), in {head['seconds'] / 60:.0f} minutes "
            f"for the whole run at {head['peak_rss_gb']:.2f} GB peak: "
            + ", ".join(f"{name} {rate:.1f}" for name, rate in rates.items()),
        ]
    return "\n".join(lines) + "\n"
