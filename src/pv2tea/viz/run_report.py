"""``pv2tea report``: figures and one HTML page for a training run or an experiment folder.

A run folder (``metrics.jsonl``, ``final/``, reports) gives learning curves, source-aware bars,
per-attribute F1 and the learned S2 attention masks on product images. An experiment folder
(``experiment.json``) gives the ablation bars, source-aware bars per variant, retrieval vs α and
the paper-style tables.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from pv2tea.eval.report import format_report_table
from pv2tea.renamed import current_row_name
from pv2tea.viz import figures
from pv2tea.viz.html import Section, write_html_report


def _reports(run_dir: Path) -> dict[str, dict]:
    named = {
        "test": "test_report.json",
        "validation": "val_report.json",
        "weak text labels (test)": "weak_labels_test_report.json",
    }
    return {name: json.loads((run_dir / f).read_text()) for name, f in named.items() if (run_dir / f).is_file()}


def _mask_section(
    run_dir: Path, data: Path | None, out: Path, n_masks: int, notes: list[str] | None = None
) -> Section | None:
    from pv2tea.data.validate import load_dataset
    from pv2tea.inference.predictor import Predictor

    model_dir = run_dir / "final" if (run_dir / "final").is_dir() else run_dir / "checkpoint"
    asked = data is not None  # --data given: a file without a drawable product is an error, not a missing figure
    if data is None:
        report = run_dir / "data_report.json"
        files = list(json.loads(report.read_text())) if report.is_file() else []
        data = Path(files[-1]) if files else None
    if data is None or not model_dir.is_dir():
        return None
    predictor = Predictor.from_checkpoint(model_dir)
    if predictor.model.visual is None or predictor.model.visual.mask_head is None:
        return None
    loaded = load_dataset(data, skip_invalid=True, require_label=False)  # a mask needs an image, not a label
    seen, records = set(), []
    for r in loaded.records:
        if r.images and r.images[0] not in seen:
            seen.add(r.images[0])
            records.append(r)
        if len(records) >= n_masks:
            break
    if not records:
        if asked:
            raise ValueError(
                f"{data}: no valid row with an image to draw the attention masks on"
                + (f" ({loaded.n_skipped} invalid row(s) skipped)" if loaded.n_skipped else "")
            )
        return None
    masks = [m.numpy() if m is not None else None for m in predictor.attention_masks(records)]
    images = [Image.open(r.images[0]).convert("RGB") for r in records]
    titles = [f"{r.category} ({r.id})" for r in records]
    path = figures.mask_overlays(images, masks, titles, out / "attention_masks.png")
    caption = "σ(M) per patch, upsampled over the product image: bright = kept, dark = pruned background."
    if loaded.skipped:  # a counted skip, never a silent one
        caption += (
            f" {len(loaded.skipped)} invalid row(s) of {data} were skipped; the first: {loaded.skipped[0]}"
            f" (`pv2tea data validate {data}` lists them all)."
        )
        if notes is not None:
            notes.append(
                f"{data}: {len(loaded.skipped)} invalid row(s) skipped for the attention masks; "
                f"the first: {loaded.skipped[0]}"
            )
    return Section("Learned attention masks (S2)", [path], [], caption)


def build_run_report(
    run_dir: Path, out: Path, data: Path | None = None, n_masks: int = 8, notes: list[str] | None = None
) -> Path:
    """The run's figures and index.html; ``notes``, when given, is extended with what the reader should know
    (invalid rows of ``data`` that were skipped)."""
    sections: list[Section] = []
    metrics_file = run_dir / "metrics.jsonl"
    if metrics_file.is_file():
        epochs = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
        if epochs:
            sections.append(
                Section(
                    "Learning curves",
                    [figures.learning_curves(epochs, out / "learning_curves.png")],
                    [],
                    "Loss terms per epoch, mean S3 weight and validation F1.",
                )
            )
    reports = _reports(run_dir)
    if reports:
        tables = [format_report_table(r, title=name) for name, r in reports.items()]
        sections.append(
            Section(
                "Source-aware evaluation",
                [
                    figures.source_aware_bars(reports, out / "source_aware.png"),
                    figures.attribute_f1(reports, out / "attribute_f1.png"),
                ],
                tables,
            )
        )
    masks = _mask_section(run_dir, data, out, n_masks, notes)
    if masks:
        sections.append(masks)
    return write_html_report(out, f"pv2tea run {run_dir}", sections)


def build_experiment_report(exp_dir: Path, out: Path) -> Path:
    """The figures and ``index.html`` of an experiment folder (``pv2tea experiment``); returns the page."""
    meta = json.loads((exp_dir / "experiment.json").read_text())
    summary: dict[str, Any] = {current_row_name(name): e for name, e in meta["summary"].items()}  # today's names
    table = {
        name: {
            m: (e["overall"][m]["mean"], e["overall"][m]["std"]) if e["overall"][m]["mean"] is not None else None
            for m in ("precision", "recall", "f1")
        }
        for name, e in summary.items()
    }
    figs = [figures.ablation_bars(table, out / "variants_f1.png", metric="f1")]
    seed_reports = {}
    for name in summary:
        first = sorted((exp_dir / name).glob("seed_*/test_report.json"))
        if first:
            seed_reports[name] = json.loads(first[0].read_text())
    if seed_reports:
        figs.append(figures.source_aware_bars(seed_reports, out / "source_aware_variants.png"))
    alphas = {0.4: "pv2tea", 0.0: "wo_smooth", 0.2: "alpha_0.2", 0.6: "alpha_0.6", 0.8: "alpha_0.8"}
    sweep = {
        a: {k: v["mean"] for k, v in summary[n]["retrieval"].items()}
        for a, n in sorted(alphas.items())
        if n in summary and "retrieval" in summary[n]
    }
    matching = summary.get("matching", {}).get("retrieval")
    baseline = {k: v["mean"] for k, v in matching.items()} if matching else None
    if len(sweep) >= 2:
        figs.append(figures.retrieval_vs_alpha(sweep, out / "retrieval_vs_alpha.png", baseline=baseline))
    tables_md = (exp_dir / "tables.md").read_text() if (exp_dir / "tables.md").is_file() else ""
    sections = [
        Section(
            "Variants",
            figs,
            [tables_md],
            f"seeds: {meta['seeds']}; config: {meta['config']} {' '.join(meta['overrides'])}",
        )
    ]
    pv2tea_run = exp_dir / "pv2tea" / f"seed_{meta['seeds'][0]}"
    if pv2tea_run.is_dir():
        masks = _mask_section(pv2tea_run, None, out, 8)
        if masks:
            sections.append(masks)
    return write_html_report(out, f"pv2tea experiment {exp_dir}", sections)


def build_report(path: Path, out: Path | None = None, data: Path | None = None, notes: list[str] | None = None) -> Path:
    """The report of a run folder or of an experiment folder (``pv2tea report``), in ``out`` (``path/report``).

    Raises:
        FileNotFoundError: ``path`` is neither a run nor an experiment.
    """
    out = out or path / "report"
    out.mkdir(parents=True, exist_ok=True)
    if (path / "experiment.json").is_file():
        return build_experiment_report(path, out)
    if not (path / "metrics.jsonl").is_file() and not (path / "final").is_dir():
        raise FileNotFoundError(
            f"{path} is neither a pv2tea run (metrics.jsonl, final/) nor an experiment (experiment.json)"
        )
    return build_run_report(path, out, data, notes=notes)
