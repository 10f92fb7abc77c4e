"""``pv2tea demo``: the whole method on a synthetic catalog in a few minutes on a CPU (:func:`pv2tea.demo.run_demo`)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer

from pv2tea.cli.common import console, expected_errors, fail, out_console, quiet_libraries, warn


def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the catalog and the run.")] = Path("demo_out"),
    n_products: Annotated[int, typer.Option(min=20)] = 500,
    epochs: Annotated[int | None, typer.Option(min=1, help="Default: the cpu preset's.")] = None,
    seed: int = 0,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Extra dotted config overrides.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Synthetic catalog → train PV2TEA on weak text labels → source-aware comparison on gold."""
    quiet_libraries()
    from pv2tea.demo import run_demo
    from pv2tea.eval.report import compare_table, format_report_table

    t0 = time.time()
    try:
        result = run_demo(
            out,
            n_products=n_products,
            epochs=epochs,
            seed=seed,
            overrides=overrides or (),
            progress=progress,
            log=console.print,
            warn=warn,
        )
    except expected_errors() as exc:
        fail(str(exc))
    out_console.print(
        format_report_table(result.model_report, title="PV2TEA on the test split (gold values)"), highlight=False
    )
    out_console.print(
        compare_table(
            {
                "weak text labels": result.weak_report,
                "PV2TEA": result.model_report,
                "PV2TEA + kept labels": result.kept_report,
            },
            metrics=("f1", "accuracy"),
            title="vs the text-rule weak labels it was trained on (+ kept labels: a weak "
            "label its text states is kept, PV2TEA answers the rest)",
        ),
        highlight=False,
    )
    out_console.print(
        f"catalog {n_products} products, train rows {result.train_rows}, "
        f"test rows {result.test_rows}; training {result.train_seconds:.0f} s, total {time.time() - t0:.0f} s "
        f"on {os.cpu_count()} CPU core(s)",
        highlight=False,
    )
