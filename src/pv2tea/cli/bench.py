"""``pv2tea bench``: accuracy benchmarks (the weak-label protocol on ImplicitAVE or on your own gold-labelled
catalogue) and speed benchmarks (S3's weights, training, extraction, serving), most of these on synthetic data.

Each prints its tables and, as its last line, one JSON object of its headline figures.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from pv2tea.cli.common import csv_items, expected_errors, fail, log, need_extra, out_console, quiet_libraries
from pv2tea.config import load_config
from pv2tea.renamed import warn_renamed

# the warm start's epochs by default: the preset warm-start's (what pv2tea.bench.protocol reads, without torch)
WARM_START_EPOCHS = load_config("warm-start").train.epochs
OLD_WARM_START_FLAG_HELP = "The old name of --warm-start-epochs."
CalibrationObjectiveOption = Annotated[
    str,
    typer.Option(
        help="What the calibrated rows choose each attribute's share by: 'balanced' (every gold value alike) or "
        "'accuracy' (every row alike); as pv2tea calibrate --objective."
    ),
]


def _warm_start_epochs(epochs: int, old: int | None) -> int:
    """--warm-start-epochs, or the value of its old name --text-pretrain (which warns once) when that is given."""
    if old is None:
        return epochs
    warn_renamed("--text-pretrain", "--warm-start-epochs")
    return old


app = typer.Typer(
    no_args_is_help=True,
    help="Benchmarks: accuracy on ImplicitAVE or your own catalogue; speed of S3, training, extraction and serving "
    "on synthetic data.",
)


@app.command("implicitave")
def bench_implicitave(
    root: Annotated[Path, typer.Argument(help="ImplicitAVE repository root (the folder holding data/).")],
    out: Annotated[Path, typer.Option("--out", help="Benchmark folder (re-run to resume).")] = Path(
        "bench_implicitave"
    ),
    domains: Annotated[str | None, typer.Option(help="Comma-separated domains; default: all present.")] = None,
    folds: Annotated[int, typer.Option(min=2, help="k of the k-fold cross-validation over products.")] = 5,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "0",
    variants: Annotated[str, typer.Option(help="Comma-separated PV2TEA variants (see `experiment`).")] = "tea,pv2tea",
    gold_ceiling: Annotated[
        bool, typer.Option("--gold-ceiling/--no-gold-ceiling", help="Also train on gold labels.")
    ] = True,
    text_rows: Annotated[
        int,
        typer.Option(help="Text-only training rows (image-less samples) per epoch (0: none, -1: all of train.tsv)."),
    ] = 1000,
    text_pool: Annotated[
        int | None,
        typer.Option(
            help="Draw the --text-rows afresh each epoch from this many text-only rows (-1: all of train.tsv); default: one fixed sample of --text-rows rows."
        ),
    ] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Epochs of each fold's run on the products.")] = 5,
    warm_start_epochs: Annotated[
        int,
        typer.Option(
            min=0,
            help="Epochs of the warm start, a TEA trained once per domain on all its text-only rows, whose text encoder, fusion and decoder start every fold's run (0: none).",
        ),
    ] = WARM_START_EPOCHS,
    text_pretrain: Annotated[int | None, typer.Option(min=0, hidden=True, help=OLD_WARM_START_FLAG_HELP)] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="1 fold, 1 seed (smoke test; the full protocol's fold 0).")
    ] = False,
    calibration_objective: CalibrationObjectiveOption = "accuracy",
    config: Annotated[str | None, typer.Option("--config", "-c")] = "cpu",
    overrides: Annotated[list[str] | None, typer.Option("--set")] = None,
) -> None:
    """Weak labels from a TF-IDF text extractor -> k-fold PV2TEA vs TEA vs the extractor, per domain.

    The last line printed is a JSON object {"domains": {DOMAIN: {VARIANT: {"f1", "accuracy", "f1_open"}}}}
    (f1/accuracy: answers ranked among the closed option lists, ImplicitAVE-style).
    """
    quiet_libraries()
    from pv2tea.bench.implicitave import BenchConfig, headline, run_bench

    try:
        cfg = BenchConfig(
            root=root,
            out=out,
            domains=[d.strip() for d in domains.split(",")] if domains else None,
            folds=folds,
            seeds=[int(s) for s in csv_items(seeds)],
            variants=csv_items(variants),
            gold_ceiling=gold_ceiling,
            text_rows=text_rows,
            text_pool=text_pool,
            epochs=epochs,
            warm_start_epochs=_warm_start_epochs(warm_start_epochs, text_pretrain),
            quick=quick,
            config=config or "cpu",
            overrides=overrides or [],
            calibration_objective=calibration_objective,  # type: ignore[arg-type]  # checked by the config
        )
        results = run_bench(cfg, log=log)
    except expected_errors() as exc:
        fail(str(exc))
    out_console.print((out / "tables.md").read_text(), highlight=False)
    print(json.dumps(headline(results)))


@app.command("catalog")
def bench_catalog(
    data: Annotated[Path, typer.Argument(help="Catalogue file: rows with gold values and images (JSONL/CSV/Parquet).")],
    out: Annotated[Path, typer.Option("--out", help="Benchmark folder (re-run to resume).")] = Path("bench_catalog"),
    text_share: Annotated[
        float, typer.Option(help="Share of the products whose texts and gold train the text extractor.")
    ] = 0.5,
    name: Annotated[str | None, typer.Option(help="The catalogue's name in tables (default: the file's stem).")] = None,
    products: Annotated[
        int | None, typer.Option(min=2, help="Run on a stable random sample of this many products (default: all).")
    ] = None,
    probes: Annotated[
        bool, typer.Option("--probes/--no-probes", help="Image-only anchors: linear probes on frozen features.")
    ] = True,
    folds: Annotated[int, typer.Option(min=2, help="k of the k-fold cross-validation over products.")] = 5,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "0",
    variants: Annotated[str, typer.Option(help="Comma-separated PV2TEA variants (see `experiment`).")] = "tea,pv2tea",
    gold_ceiling: Annotated[
        bool, typer.Option("--gold-ceiling/--no-gold-ceiling", help="Also train on gold labels.")
    ] = True,
    text_rows: Annotated[
        int, typer.Option(help="Text-labelled rows (image-less samples) per epoch of a fold's run (0: none, -1: all).")
    ] = 1000,
    epochs: Annotated[int, typer.Option(min=1, help="Epochs of each fold's run on the catalogue.")] = 5,
    warm_start_epochs: Annotated[
        int, typer.Option(min=0, help="Epochs of the warm start on the text-labelled rows (0: none).")
    ] = WARM_START_EPOCHS,
    text_pretrain: Annotated[int | None, typer.Option(min=0, hidden=True, help=OLD_WARM_START_FLAG_HELP)] = None,
    quick: Annotated[bool, typer.Option("--quick", help="1 fold, 1 seed (the full protocol's fold 0).")] = False,
    calibration_objective: CalibrationObjectiveOption = "accuracy",
    config: Annotated[str | None, typer.Option("--config", "-c")] = "cpu",
    overrides: Annotated[list[str] | None, typer.Option("--set")] = None,
) -> None:
    """The weak-label protocol on your own gold-labelled catalogue: extractor vs TEA vs PV2TEA, by source.

    The last line printed is a JSON object {"catalog": {"overall": {VARIANT: {"f1", "f1_text", "f1_image", "gap"}},
    "attributes": {...}, "p": {VARIANT: {"vs_extractor", "vs_tea"}}, "seconds", "peak_rss_gb"}} (F1 in points, ranked
    among the text-labelled share's values; overall: the mean over attributes).
    """
    quiet_libraries()
    from pv2tea.bench.catalog import CatalogBenchConfig, catalog_headline, run_catalog_bench

    try:
        cfg = CatalogBenchConfig(
            data=data,
            out=out,
            text_share=text_share,
            name=name,
            products=products,
            probes=probes,
            folds=folds,
            seeds=[int(s) for s in csv_items(seeds)],
            variants=csv_items(variants),
            gold_ceiling=gold_ceiling,
            text_rows=text_rows,
            epochs=epochs,
            warm_start_epochs=_warm_start_epochs(warm_start_epochs, text_pretrain),
            quick=quick,
            config=config or "cpu",
            overrides=overrides or [],
            fold_score="attribute_mean",
            calibration_objective=calibration_objective,  # type: ignore[arg-type]  # checked by the config
        )
        results = run_catalog_bench(cfg, log=log)
    except expected_errors() as exc:
        fail(str(exc))
    out_console.print((out / "tables.md").read_text(), highlight=False)
    print(json.dumps(catalog_headline(results)))


@app.command("neighbors")
def bench_neighbors(
    quick: Annotated[
        bool, typer.Option("--quick", help="One process per N instead of the fastest of two (N up to 1M still).")
    ] = False,
    sizes: Annotated[str, typer.Option(help="Comma-separated numbers of rows N.")] = "10000,100000,1000000",
    k: Annotated[int, typer.Option(min=1, help="Neighbours per row (schemes.knn_k).")] = 10,
    dim: Annotated[int, typer.Option(min=2, help="Feature dimensions.")] = 256,
) -> None:
    """S3's weights for N synthetic clustered rows, each N in a fresh process: seconds, peak RSS, recall@K.

    The last line printed is a JSON object {"neighbors": {N: {"seconds", "cpu_seconds", "peak_gib", "recall"}},
    "exponent", "cpu_exponent"} (exponent: the fitted slope of log seconds on log N).
    """
    from pv2tea.bench.neighbors import NeighborBenchConfig, format_table, run_neighbor_bench

    try:
        cfg = NeighborBenchConfig(
            sizes=tuple(int(n) for n in csv_items(sizes)), k=k, dim=dim, repeats=1 if quick else 2
        )
        result = run_neighbor_bench(cfg, log=log)
    except (RuntimeError, ValueError) as exc:
        fail(str(exc))
    out_console.print(format_table(result), highlight=False)
    print(json.dumps(result))


@app.command("train")
def bench_train(
    quick: Annotated[
        bool, typer.Option("--quick", help="Fewer products and steps (the memory runs still go up to 1M rows).")
    ] = False,
    config: Annotated[str | None, typer.Option("--config", "-c", help="Preset name or YAML file.")] = "cpu",
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Dotted override, as for train.")] = None,
    memory_sizes: Annotated[
        str, typer.Option("--memory-sizes", help="Comma-separated rows N of the memory runs (empty: none).")
    ] = "10000,100000,1000000",
    processes: Annotated[
        str, typer.Option("--processes", help="Comma-separated process counts of the scaling runs (empty: none).")
    ] = "1,2",
    threads: Annotated[
        int,
        typer.Option("--threads", min=1, help="torch threads (one: CPU time measures the work on a shared machine)."),
    ] = 1,
) -> None:
    """Training speed on cached features: samples/s, FLOPs, mfu against the measured GEMM peak, the feature
    cache's speed-up, 1 vs 2 processes, and peak memory at 10K, 100K and 1M cached rows.

    The last line printed is a JSON object {"train": {"samples_per_s", "mfu", "cache_speedup", "peak_rss_gib",
    "processes", "memory", ...}}.
    """
    quiet_libraries()
    from pv2tea.bench.train import TrainBenchConfig, format_table, run_train_bench

    settings = lambda: {  # noqa: E731  (parsed inside the bench's error handling)
        "config": config or "cpu",
        "overrides": tuple(overrides or ()),
        "memory_sizes": tuple(int(n) for n in csv_items(memory_sizes)),
        "processes": tuple(int(n) for n in csv_items(processes)),
        "threads": threads,
    }
    _run_and_print(TrainBenchConfig, settings, quick, run_train_bench, format_table)


def _run_and_print(
    config_type: Any,
    settings: Callable[[], dict[str, Any]],
    quick: bool,
    run: Callable[..., dict[str, Any]],
    table: Callable[[dict[str, Any]], Any],
) -> None:
    """Build a speed bench's config (its ``quick`` form with ``--quick``), run it, print its table and, last, its
    result as one JSON line; a bad setting or a failed run is one clear error line."""
    try:
        values = settings()
        cfg = config_type.quick(**values) if quick else config_type(**values)
        result = run(cfg, log=log)
    except expected_errors(RuntimeError) as exc:
        fail(str(exc))
    out_console.print(table(result))
    print(json.dumps(result))


@app.command("extract")
def bench_extract(
    quick: Annotated[bool, typer.Option("--quick", help="Fewer products, one round.")] = False,
    model: Annotated[
        Path | None, typer.Option("--model", "-m", help="A trained model folder (default: the untrained cpu preset).")
    ] = None,
    candidates: Annotated[
        bool, typer.Option("--candidates", help="Rank each row's candidate list instead of generating.")
    ] = False,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    threads: Annotated[
        int,
        typer.Option("--threads", min=1, help="torch threads (one: CPU time measures the work on a shared machine)."),
    ] = 1,
) -> None:
    """Batch extraction end to end (JPEG decode, tokenizing, generation or ranking) against the bare encoders.

    The last line printed is a JSON object {"extract": {"products_per_s", "bare_encoders_per_s", "ratio", ...}}.
    """
    quiet_libraries()
    from pv2tea.bench.extract import ExtractBenchConfig, format_table, run_extract_bench

    settings = lambda: {"model": model, "candidates": candidates, "batch_size": batch_size, "threads": threads}  # noqa: E731
    _run_and_print(ExtractBenchConfig, settings, quick, run_extract_bench, format_table)


@app.command("serve")
def bench_serve(
    model: Annotated[Path, typer.Option("--model", "-m", help="A trained model folder (RUN/final).")],
    clients: Annotated[int, typer.Option(min=1, help="Concurrent clients of the loaded phase.")] = 32,
    seconds: Annotated[float, typer.Option(min=0.1, help="Duration of the loaded phase.")] = 60.0,
    quick: Annotated[bool, typer.Option("--quick", help="A few seconds per phase (smoke test).")] = False,
    max_requests: Annotated[
        int, typer.Option("--max-requests", min=1, help="Request budget of the loaded phase.")
    ] = 100_000,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Dataset file whose rows are sent (default: a small synthetic catalog)."),
    ] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="The batched server's --max-batch.")] = 32,
    max_wait_ms: Annotated[
        float, typer.Option("--max-wait-ms", min=0.0, help="The batched server's --max-wait-ms.")
    ] = 5.0,
    threads: Annotated[
        int | None,
        typer.Option("--threads", min=1, help="torch threads of each server (default: torch's, one per core)."),
    ] = None,
    precision: Annotated[str, typer.Option("--precision", help="Each server's --precision (fp32, bf16).")] = "fp32",
    attack: Annotated[
        bool,
        typer.Option(
            "--attack",
            help="Then, on a third server, the valid traffic alone and beside a hostile mix (elongated images, huge "
            "strings, lone surrogates, deep nesting, invalid UTF-8, slow clients, images that outlast the timeout).",
        ),
    ] = False,
    attack_rate: Annotated[
        float, typer.Option("--attack-rate", min=0.01, help="Hostile requests started per second (--attack).")
    ] = 2.0,
    attack_timeout: Annotated[
        float, typer.Option("--attack-timeout", min=0.1, help="The attacked server's --request-timeout (--attack).")
    ] = 5.0,
) -> None:
    """The HTTP service under load: micro-batching with N clients vs one request at a time, on loopback.

    Mixes valid requests with malformed and oversized ones. The last line printed is a JSON object
    {"serve": {"clients", "requests", "status_counts", "server_errors", "p50_ms", "p99_ms", "rows_per_s",
    "rows_per_s_one_at_a_time", "speedup", "rss_growth"}}; with --attack it ends with "attack": {"server_errors",
    "rows_per_s_ratio" (valid rows/s beside the attack / without), "peak_rss_ratio" (peak / idle server),
    "max_overrun_s" (longest work after a 504), "p50_ms", "p99_ms"}.
    """
    quiet_libraries()
    need_extra("bench serve", "serve", "httpx", "fastapi", "uvicorn", "prometheus_client")
    from pv2tea.bench.serve import ServeBenchConfig, format_table, run_serve_bench

    try:
        cfg = ServeBenchConfig(
            model=model,
            clients=clients,
            seconds=5.0 if quick else seconds,
            baseline_seconds=3.0 if quick else min(20.0, max(seconds / 3, 3.0)),
            max_requests=max_requests,
            data=data,
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            threads=threads,
            precision=precision,
            attack=attack,
            attack_rate=attack_rate,
            attack_timeout=attack_timeout,
        )
        result = run_serve_bench(cfg, log=log)
    except expected_errors(RuntimeError) as exc:
        fail(str(exc))
    out_console.print(format_table(result), highlight=False)
    print(json.dumps({"serve": result["serve"]}))
