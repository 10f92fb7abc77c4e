"""``pv2tea data``: the synthetic catalog (``synth``), checking a dataset file (``validate``) and converting public
datasets into pv2tea's rows (``import implicitave``, ``import fashion-product-images``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pv2tea.cli.common import console, expected_errors, fail, out_console, warn

app = typer.Typer(
    no_args_is_help=True,
    help="Dataset tools: a synthetic catalog, validation, and import of ImplicitAVE or Fashion Product Images.",
)
import_app = typer.Typer(
    no_args_is_help=True, help="Convert ImplicitAVE or a Fashion Product Images catalogue into pv2tea's row format."
)
app.add_typer(import_app, name="import")


@app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option("--out", help="Output folder (images/, train/val/test.jsonl, catalog.json).")],
    n_products: Annotated[int, typer.Option(min=10)] = 600,
    seed: int = 0,
    image_size: Annotated[int, typer.Option(min=32)] = 112,
) -> None:
    """Generate the synthetic demo catalog (deterministic by seed)."""
    from pv2tea.data.synth import make_catalog

    paths = make_catalog(out, n_products=n_products, seed=seed, image_size=image_size)
    stats = json.loads((Path(out) / "catalog.json").read_text())
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")
    out_console.print_json(json.dumps(stats.get("weak_label_accuracy", {})))


@app.command("validate")
def data_validate(
    file: Annotated[Path, typer.Argument(help="Dataset file (JSONL/CSV/Parquet).")],
    no_images: Annotated[bool, typer.Option("--no-images", help="Skip opening the images.")] = False,
    unlabelled: Annotated[bool, typer.Option("--unlabelled", help="Rows need no label (prediction input).")] = False,
) -> None:
    """Check a dataset file; exit code 1 when any row is bad, 2 when it cannot be read or has no rows."""
    from pv2tea.data.readers import check_table
    from pv2tea.data.validate import validate_file

    try:
        check_table(file)
        warnings: list[str] = []
        errors = validate_file(file, check_images=not no_images, require_label=not unlabelled, warnings=warnings)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    for warning in warnings:
        warn(warning)
    if errors:
        for error in errors:
            out_console.print(str(error), highlight=False)
        rows = len({e.row for e in errors})
        fail(f"{len(errors)} problem(s) in {rows} row(s) of {file}", code=1)
    out_console.print(f"{file}: all rows valid")


@import_app.command("implicitave")
def data_import_implicitave(
    root: Annotated[
        Path, typer.Argument(help="ImplicitAVE checkout (holds data/evaluation_data, data/training_data).")
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="Output folder: <Domain>/{train_text,val_text,eval}.jsonl, candidates.json, manifest.json."
        ),
    ],
    skip_invalid: Annotated[
        bool, typer.Option("--skip-invalid", help="Skip and count bad rows instead of failing.")
    ] = False,
) -> None:
    """Import ImplicitAVE: text-only training rows, multimodal evaluation rows, candidate values."""
    from pv2tea.data.implicitave import import_implicitave

    try:
        manifest = import_implicitave(root, out, skip_invalid=skip_invalid)
    except expected_errors() as exc:
        fail(str(exc))
    for domain, entry in manifest["domains"].items():
        rows = ", ".join(f"{split} {n}" for split, n in entry["rows"].items())
        sources = entry["sources"]
        options = entry["options"]["file"] or "none"
        out_console.print(
            f"{domain}: {rows}; eval source text {sources['text']} / image {sources['image']}; "
            f"options {options}" + (f"; {entry['n_skipped']} row(s) skipped" if entry["n_skipped"] else ""),
            highlight=False,
        )
    console.print(f"wrote {Path(out) / 'manifest.json'}")


@import_app.command("fashion-product-images")
def data_import_fashion(
    root: Annotated[Path, typer.Argument(help="Folder in Kaggle's layout: styles.csv, styles/<id>.json, images/.")],
    out: Annotated[Path, typer.Option("--out", help="Output data file (.jsonl, .csv or .parquet).")],
    attributes: Annotated[
        str | None,
        typer.Option(help="Comma-separated attributes ('all': every one); default: colour and 10 article attributes."),
    ] = None,
    text: Annotated[str, typer.Option(help="The row's text: 'full' (title + descriptions) or 'title'.")] = "full",
    min_products: Annotated[
        int, typer.Option(min=1, help="Drop a value held by fewer products of its attribute (a counted skip).")
    ] = 20,
    limit: Annotated[int | None, typer.Option(min=1, help="Read only the first N products.")] = None,
) -> None:
    """Import a Fashion Product Images catalogue: one row per (product, attribute) with gold, photo and source."""
    from rich.table import Table

    from pv2tea.data.fashion import (
        DEFAULT_ATTRIBUTES,
        FashionImportConfig,
        import_fashion_product_images,
        manifest_path,
    )

    if attributes is None:
        chosen: tuple[str, ...] | None = DEFAULT_ATTRIBUTES
    elif attributes.strip().casefold() == "all":
        chosen = None
    else:
        chosen = tuple(a.strip() for a in attributes.split(",") if a.strip())
    try:
        cfg = FashionImportConfig(
            root=root,
            out=out,
            attributes=chosen,
            text=text,  # type: ignore[arg-type]  # checked by FashionImportConfig
            min_products=min_products,
            limit=limit,
        )
        manifest = import_fashion_product_images(cfg)
    except expected_errors() as exc:
        fail(str(exc))
    table = Table("attribute", "rows", "text", "image", "values", "rare-value rows")
    for name, entry in manifest["attributes"].items():
        table.add_row(
            name,
            str(entry["rows"]),
            str(entry["text"]),
            str(entry["image"]),
            str(len(entry["values"])),
            str(entry["rare_value_rows"]),
        )
    out_console.print(table)
    out_console.print(
        f"{manifest['rows']} rows of {manifest['products']} products; {manifest['n_skipped']} product(s) skipped"
        + (
            f"; attributes not found: {', '.join(manifest['attributes_not_found'])}"
            if manifest["attributes_not_found"]
            else ""
        ),
        highlight=False,
    )
    console.print(f"wrote {out} and {manifest_path(out)}")
