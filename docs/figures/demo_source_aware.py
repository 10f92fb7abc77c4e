"""Draw the README's figure from the reports `make demo` writes.

    python docs/figures/demo_source_aware.py [DEMO_DIR] [OUT]     # defaults: demo_out, docs/figures/demo_source_aware.png

Source-aware F1 and accuracy (gold value stated in the text vs shown only in the image) of the weak text labels,
PV2TEA trained on them, and PV2TEA deployed with kept labels, with pv2tea's own figure function.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pv2tea.viz.figures import source_aware_bars

REPORTS = {
    "weak text labels": "weak_labels_test_report.json",
    "PV2TEA": "test_report.json",
    "PV2TEA + kept labels": "kept_labels_test_report.json",
}
OLD_NAMES = {"kept_labels_test_report.json": "keep_grounded_test_report.json"}  # written by earlier releases


def report_path(run: Path, name: str) -> Path:
    """The report ``name`` of the demo run ``run``, or the file of its old name when only that one exists."""
    path = run / name
    old = run / OLD_NAMES.get(name, name)
    return old if not path.is_file() and old.is_file() else path


def main(demo_dir: Path, out: Path) -> Path:
    run = demo_dir / "run"
    missing = [name for name in REPORTS.values() if not report_path(run, name).is_file()]
    if missing:
        raise SystemExit(f"{run}: no {', '.join(missing)}; run `make demo` (or `pv2tea demo --out {demo_dir}`) first")
    reports = {label: json.loads(report_path(run, name).read_text()) for label, name in REPORTS.items()}
    return source_aware_bars(reports, out, metric_names=("f1", "accuracy"))


if __name__ == "__main__":
    args = sys.argv[1:]
    demo = Path(args[0]) if args else Path("demo_out")
    target = Path(args[1]) if len(args) > 1 else Path(__file__).with_suffix(".png")
    print(main(demo, target))
