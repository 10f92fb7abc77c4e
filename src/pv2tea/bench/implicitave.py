"""ImplicitAVE benchmark: the paper's weak-supervision setting on public products.

Per domain: (1) train the text-established extractor (TF-IDF word 1–2-grams + char 3–5-grams,
logistic regression per attribute) on the domain's text-only training rows; (2) use it to weakly
label the multimodal evaluation products; (3) k-fold cross-validation over those products (folds
by product): PV2TEA and its variants train on the weak labels of k−1 folds with their images
(plus, optionally, text-only training rows as image-less samples) and are scored against gold on
the held-out fold, by free generation and ranked among the domain's closed option lists (every run starts
from a TEA trained once per domain on all its text-only rows, ``warm_start_epochs`` epochs: the warm start); a
PV2TEA trained on the gold labels of the same folds is the ceiling. Each model variant also gets a
``<variant>+extractor`` row: its candidate ranking fused with the extractor's class probabilities (the model
deployed next to the extractor, :mod:`pv2tea.decoding.fusion`). Runs resume: every finished
(fold, variant, seed) keeps its ``test_report.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pv2tea.bench.protocol import (  # re-exported: the protocol's parts were first written for this benchmark
    BENCH_OVERRIDES,
    CALIBRATED_SUFFIX,
    FOLD_RUN_SETTINGS,
    METRICS,
    REAL_DATA_OVERRIDES,
    SIGNIFICANCE_REFERENCES,
    WARM_START_OVERRIDES,
    ProtocolConfig,
    add_fold_ttests,
    format_tables,
    gold_labelled,
    per_fold_f1,
    run_protocol,
    summarize_runs,
)
from pv2tea.data.folds import product_folds
from pv2tea.data.implicitave import discover_domains, domain_paths, import_implicitave
from pv2tea.data.validate import load_dataset

__all__ = [
    "BENCH_OVERRIDES",
    "CALIBRATED_SUFFIX",
    "FOLD_RUN_SETTINGS",
    "METRICS",
    "REAL_DATA_OVERRIDES",
    "SIGNIFICANCE_REFERENCES",
    "WARM_START_OVERRIDES",
    "BenchConfig",
    "add_fold_ttests",
    "format_tables",
    "gold_labelled",
    "headline",
    "per_fold_f1",
    "product_folds",
    "run_bench",
    "run_domain",
    "summarize_runs",
]


@dataclass(kw_only=True)
class BenchConfig(ProtocolConfig):
    root: Path  # the ImplicitAVE repository root (holds data/)
    out: Path  # benchmark folder: imported data, extractors, runs, results
    domains: list[str] | None = None  # None: every domain present


def run_domain(domain: str, cfg: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The protocol on one domain: its own text-only training rows and its evaluation products."""
    paths = domain_paths(cfg.out / "data", domain)
    if not paths.eval.is_file():
        raise FileNotFoundError(f"{paths.eval}: domain '{domain}' has no evaluation products")
    if not paths.train_text.is_file():
        raise FileNotFoundError(f"{paths.train_text}: domain '{domain}' has no text-only training rows")
    text_rows = load_dataset(paths.train_text).records
    products = load_dataset(paths.eval, require_label=False).records
    candidates = json.loads(paths.candidates.read_text()) if paths.candidates.is_file() else None
    return run_protocol(domain, text_rows, products, candidates, cfg.out / "runs" / domain, cfg, log).summaries


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Import (once), then run every requested domain; writes ``bench.json`` and ``tables.md``."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    data_dir = cfg.out / "data"
    if not (data_dir / "manifest.json").is_file():
        import_implicitave(cfg.root, data_dir)
    present = discover_domains(cfg.root)
    domains = cfg.domains or present
    missing = [d for d in domains if d not in present]
    if missing:
        raise ValueError(f"domain(s) {missing} not in {cfg.root} (present: {', '.join(present)})")
    results = {"domains": {}, "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items()}}
    for domain in domains:
        results["domains"][domain] = run_domain(domain, cfg, log)
        (cfg.out / "bench.json").write_text(json.dumps(results, indent=2, allow_nan=False))
    (cfg.out / "tables.md").write_text(format_tables(results))
    return results


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The one-line summary: candidate-constrained macro-F1 and accuracy (ImplicitAVE-style) per variant."""
    return {
        "domains": {
            d: {
                v: {
                    "f1": _round(s["constrained"]["f1"]["mean"]),
                    "accuracy": _round(s["constrained"]["accuracy"]["mean"]),
                    "f1_open": _round(s["open"]["f1"]["mean"]),
                }
                for v, s in variants.items()
            }
            for d, variants in results["domains"].items()
        }
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)
