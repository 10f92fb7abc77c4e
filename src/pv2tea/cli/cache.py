"""``pv2tea cache``: the frozen backbones' features encoded once to disk (``build``) and what a cache folder holds
(``info``)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from pv2tea.cli.common import console, expected_errors, fail, load_data, out_console, quiet_libraries

app = typer.Typer(no_args_is_help=True, help="The frozen backbones' feature cache on disk.")


@app.command("build")
def cache_build(
    data: Annotated[
        list[Path], typer.Option("--data", help="Products whose images and texts to encode (repeat: train, val).")
    ],
    out: Annotated[Path, typer.Option("--out", help="The cache folder (set train.feature_cache_dir to it).")],
    config: Annotated[str | None, typer.Option("--config", "-c", help="Preset name or YAML file.")] = "cpu",
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Dotted override, as for train.")] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", min=0, help="Image-decoding worker processes (default: one per core).")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images or texts encoded at a time.")] = 32,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Discard what the folder holds and encode anew.")] = False,
    skip_invalid: Annotated[bool, typer.Option("--skip-invalid")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Encode the images and texts of the data with the config's frozen backbone(s) into OUT, once.

    Training with --set train.feature_cache_dir=OUT (and the same config) then reads the features from disk. Only
    what OUT lacks is encoded; a folder of another backbone is refused (--rebuild discards it).
    """
    quiet_libraries()
    from pv2tea.cache.build import ensure_cache, model_for_cache, run_cache_rows
    from pv2tea.cache.store import FeatureCacheError, summary
    from pv2tea.config import load_config

    t0 = time.time()
    try:
        cfg = load_config(config, overrides)
        records = [r for path in data for r in load_data(path, skip_invalid).records]
        model, pre = model_for_cache(cfg, records)
        images, texts = run_cache_rows(model, pre, records)
        _, counts = ensure_cache(
            out,
            model,
            pre,
            images,
            texts,
            batch_size=batch_size,
            workers=(os.cpu_count() or 1) if workers is None else workers,
            rebuild=rebuild,
            progress=progress,
            notify=lambda m: console.print(f"[yellow]{escape(m)}[/]", highlight=False),
        )
    except expected_errors(FeatureCacheError) as exc:
        fail(str(exc))
    console.print(
        f"encoded {counts['images_encoded']} image(s) and {counts['texts_encoded']} text(s) in "
        f"{time.time() - t0:.1f} s",
        highlight=False,
    )
    _print_cache_summary(summary(out))


def _print_cache_summary(info: dict) -> None:
    from rich.table import Table

    table = Table(title=f"feature cache {info['directory']}: {info['state']}", show_edge=False)
    for col in ("section", "rows", "shards", "MiB", "encoded by"):
        table.add_column(col, justify="left" if col in ("section", "encoded by") else "right")
    for kind in ("images", "texts"):
        part, who = info[kind], info[kind]["identity"]
        if who is None:
            encoded = "–"
        elif kind == "images":
            size = "x".join(str(v) for v in who["data_config"]["input_size"][1:])
            encoded = f"{who['backbone']} {size} px, weights {who['weights_sha256'][:12]}"
        else:
            encoded = f"{who['frozen_layers']} frozen layer(s), weights {who['weights_sha256'][:12]}"
        table.add_row(kind, str(part["rows"]), str(part["shards"]), f"{part['bytes'] / 2**20:.1f}", encoded)
    out_console.print(table)
    if not info["complete"]:
        console.print(f"[yellow]not usable as it is:[/] {escape(info['problem'])}", highlight=False)


@app.command("info")
def cache_info(
    directory: Annotated[Path, typer.Argument(help="A cache folder (pv2tea cache build --out).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
) -> None:
    """Rows, shards, size and backbone identity of a feature cache, and whether it is complete (exit code 1 if not)."""
    from pv2tea.cache.store import FeatureCacheError, summary

    try:
        info = summary(directory)
    except FeatureCacheError as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(info))
    else:
        _print_cache_summary(info)
    if not info["complete"]:
        raise typer.Exit(1)
