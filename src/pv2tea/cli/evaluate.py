"""``pv2tea evaluate`` (a model against gold values, source-aware) and ``pv2tea report`` (figures and a page of a
run or an experiment)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from pv2tea.cli.common import (
    CandidatesOption,
    console,
    expected_errors,
    fail,
    need_extra,
    out_console,
    quiet_libraries,
    read_candidates,
    scan_data,
)

EVALUATE_CHUNK_ROWS = 4096  # rows `pv2tea evaluate` holds at a time


def evaluate(
    model: Annotated[Path, typer.Option("--model", "-m", help="Checkpoint folder (a run's final/ or checkpoint/).")],
    data: Annotated[Path, typer.Option("--data", help="Products with gold values (and sources).")],
    out: Annotated[Path | None, typer.Option("--out", help="Where to write the JSON report.")] = None,
    synonyms: Annotated[Path | None, typer.Option("--synonyms", help="JSON/YAML synonym map.")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    num_beams: Annotated[int | None, typer.Option(min=1)] = None,
    candidates: CandidatesOption = None,
    skip_invalid: Annotated[bool, typer.Option("--skip-invalid")] = False,
) -> None:
    """Score a model against gold values: P/R/F1 overall, by source (text/image) with the GAP, per attribute.

    The file is read as a stream (checked in full first, then predicted a chunk at a time): memory holds one chunk
    of products and, per row, only its gold and predicted values.
    """
    quiet_libraries()
    from itertools import islice

    from pv2tea.data.attributes import multi_value_attributes
    from pv2tea.data.validate import iter_records
    from pv2tea.eval.metrics import Example, source_aware_report
    from pv2tea.eval.normalize import load_synonyms
    from pv2tea.eval.report import format_report_table, write_report
    from pv2tea.inference.predictor import Predictor
    from pv2tea.models import checkpoint as ckpt

    try:
        syn = load_synonyms(synonyms) if synonyms else None
        scan = scan_data(data, skip_invalid, require_label=False)
        missing, first = 0, ""
        for _, r in iter_records(data, skip_rows=scan.bad_rows, require_label=False):
            if not r.gold:
                missing, first = missing + 1, first or r.id
        if missing:
            fail(f"{data}: {missing} row(s) have no 'gold' value (first: {first}); evaluation needs gold")
        if not scan.n_valid:
            fail(f"{data}: no valid rows to evaluate")
        multi: dict[str, bool] = ckpt.read_json(model, ckpt.PREPROCESS_FILE).get("multi_value", {})
        predictor = Predictor.from_checkpoint(model)
        cands = read_candidates(candidates)
        scored: list[tuple[tuple[str, ...], tuple[str, ...], str | None, str]] = []  # gold, pred, source, attribute
        stream = (r for _, r in iter_records(data, skip_rows=scan.bad_rows, require_label=False))
        while chunk := list(islice(stream, EVALUATE_CHUNK_ROWS)):
            preds = predictor.predict(chunk, batch_size, num_beams, progress=True, candidates=cands)
            for r, p in zip(chunk, preds):
                scored.append((tuple(r.gold or ()), tuple(p), r.source, r.attribute))
            multi = multi_value_attributes(chunk, multi)
        examples = [Example(g, p, src, attr, multi.get(attr, False)) for g, p, src, attr in scored]
        report = source_aware_report(examples, syn)
        report["skipped_rows"] = len(scan.bad_rows)
    except expected_errors() as exc:
        fail(str(exc))
    if out:
        write_report(report, out)
        console.print(f"report written to {out}")
    out_console.print(format_report_table(report, title=f"{model} on {data}"), highlight=False)


def report(
    path: Annotated[Path, typer.Argument(help="A run folder or an experiment folder.")],
    out: Annotated[Path | None, typer.Option("--out", help="Where to write the figures and index.html.")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="Products whose attention masks to draw.")] = None,
) -> None:
    """PNG figures (masks, source-aware bars, per-attribute F1, retrieval vs alpha) and one HTML page."""
    quiet_libraries()
    need_extra("report", "report", "matplotlib")
    from pv2tea.viz.run_report import build_report

    notes: list[str] = []
    try:
        index = build_report(path, out, data, notes=notes)
    except expected_errors() as exc:
        fail(str(exc))
    for note in notes:
        console.print(f"[yellow]{escape(note)}[/]", highlight=False)
    console.print(f"report: {index}")
