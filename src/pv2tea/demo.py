"""The end-to-end demo (``pv2tea demo``): a synthetic catalog, PV2TEA trained on its weak text labels, and a
source-aware comparison on the gold values of its test split.

:func:`run_demo` writes the catalog to ``OUT/catalog`` and the run to ``OUT/run``, which also receives the test
split's reports (the model; the weak labels it trained on; the model beside the weak labels its text states) and
its predictions; it returns the reports for printing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pv2tea.data.schema import LoadResult

DEMO_IMAGE_SIZE = 128  # pixels of the catalog's synthetic images


class DemoError(ValueError):
    """The demo cannot run as asked (its run folder already holds a run)."""


@dataclass(frozen=True)
class DemoResult:
    """What one demo run produced.

    Attributes:
        run_dir: The training run's folder (``OUT/run``), holding the test reports and predictions.
        model_report: PV2TEA's source-aware report on the test split's gold values.
        weak_report: The report of the test rows' weak labels (the text rules PV2TEA was trained on).
        kept_report: PV2TEA beside its labels: a weak label its text states is kept, PV2TEA answers the rest.
        train_rows: Rows PV2TEA was trained on.
        test_rows: Rows of the test split.
        train_seconds: Wall-clock time of training.
    """

    run_dir: Path
    model_report: dict[str, Any]
    weak_report: dict[str, Any]
    kept_report: dict[str, Any]
    train_rows: int
    test_rows: int
    train_seconds: float


def data_report(*results: LoadResult) -> dict[str, dict[str, Any]]:
    """Per loaded dataset file, the rows loaded and skipped and its warnings: a training run's ``data_report``."""
    return {
        r.path: {
            "rows_loaded": len(r.records),
            "rows_skipped": r.n_skipped,
            "skipped": [str(e) for e in r.skipped],
            "warnings": r.warnings,
        }
        for r in results
    }


def _ignore(message: str) -> None:
    pass


def run_demo(
    out: Path,
    *,
    n_products: int = 500,
    epochs: int | None = None,
    seed: int = 0,
    overrides: Sequence[str] = (),
    progress: bool = True,
    log: Callable[[str], None] = _ignore,
    warn: Callable[[str], None] = _ignore,
) -> DemoResult:
    """Make a synthetic catalog, train PV2TEA on its weak text labels and score it on the test split's gold values.

    Args:
        out: The demo folder: the catalog goes to ``out/catalog``, the run to ``out/run``.
        n_products: Products of the synthetic catalog.
        epochs: Training epochs (None: the ``cpu`` preset's).
        seed: Seed of the catalog and of training.
        overrides: Dotted config overrides applied after the ``cpu`` preset, the epochs and the seed.
        progress: Show training progress bars.
        log: Called with a line of progress (the catalog written).
        warn: Called with each warning about the catalog's files.

    Returns:
        The run folder, the three test reports and the sizes and training time of the run.

    Raises:
        DemoError: ``out/run`` already holds a run.
    """
    from pv2tea.config import load_config
    from pv2tea.data.synth import make_catalog
    from pv2tea.data.validate import load_dataset
    from pv2tea.eval.metrics import source_aware_report
    from pv2tea.eval.report import write_report
    from pv2tea.experiment import gold_examples, kept_labels_report
    from pv2tea.inference.predictor import Predictor
    from pv2tea.regularize.grounding import keep_labels
    from pv2tea.train.loop import evaluate_records, multi_value_attributes
    from pv2tea.train.loop import train as run_training

    t0 = time.time()
    paths = make_catalog(out / "catalog", n_products=n_products, seed=seed, image_size=DEMO_IMAGE_SIZE)
    log(f"synthetic catalog: {out / 'catalog'} ({time.time() - t0:.1f} s)")
    epoch_set = [f"train.epochs={epochs}"] if epochs else []
    cfg = load_config("cpu", [*epoch_set, f"train.seed={seed}", *overrides])

    def load(path: Path) -> LoadResult:
        data = load_dataset(path)
        for warning in data.warnings:
            warn(warning)
        return data

    train_data, val_data, test_data = (load(paths[k]) for k in ("train", "val", "test"))
    run_dir = out / "run"
    if (run_dir / "checkpoint").exists():
        raise DemoError(f"{run_dir} already holds a run; remove it or choose another --out")
    t1 = time.time()
    result = run_training(
        cfg,
        train_data.records,
        run_dir,
        val_data.records,
        progress=progress,
        data_report=data_report(train_data, val_data),
    )
    train_seconds = time.time() - t1
    predictor = Predictor.from_checkpoint(result.final_dir)
    records = test_data.records
    multi = multi_value_attributes(records)
    model_report, preds = evaluate_records(predictor.model, predictor.pre, records, cfg.train.eval_batch_size, multi)
    weak_report = source_aware_report(gold_examples(records, [r.label for r in records], multi))
    kept = keep_labels(records, preds)
    kept_report = kept_labels_report(records, preds, multi)

    write_report(model_report, run_dir / "test_report.json")
    write_report(weak_report, run_dir / "weak_labels_test_report.json")
    write_report(kept_report, run_dir / "kept_labels_test_report.json")
    with open(run_dir / "test_predictions.jsonl", "w") as f:
        for r, p, k in zip(records, preds, kept):
            row = {
                "id": r.id,
                "gold": list(r.gold or ()),
                "weak_label": list(r.label),
                "pred": p,
                "pred_kept_labels": k,
                "source": r.source,
            }
            f.write(json.dumps(row) + "\n")
    return DemoResult(
        run_dir=run_dir,
        model_report=model_report,
        weak_report=weak_report,
        kept_report=kept_report,
        train_rows=len(train_data.records),
        test_rows=len(records),
        train_seconds=train_seconds,
    )
