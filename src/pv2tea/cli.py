"""The ``pv2tea`` command line: train, evaluate, predict, data synth/validate, demo.

Each subcommand is a typed function whose signature is its CLI. Expected failures (bad data,
bad config, missing files) print one clear message and exit with a non-zero code.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:  # annotations only: the data modules load with the commands that use them
    from collections.abc import Callable, Sequence

    from pv2tea.data.schema import Record

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="PV2TEA: multimodal product attribute value extraction trained on weak text labels.",
)
data_app = typer.Typer(no_args_is_help=True, help="Dataset tools: synthetic catalog, validation.")
app.add_typer(data_app, name="data")
console = Console(stderr=True, soft_wrap=True)
out_console = Console(soft_wrap=True)


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _fail(message: str, code: int = 2) -> NoReturn:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _percent_of(total: int) -> Callable[[int], str]:
    """``k`` as a percentage of ``total`` with one decimal ("–" when there is no total)."""
    return (lambda k: f"{100.0 * k / total:.1f}") if total else (lambda k: "–")


def _need_extra(feature: str, extra: str, *modules: str) -> None:
    """Exit with the install command when a package of the optional ``extra`` that ``feature`` needs is missing."""
    from pv2tea.extras import MissingExtraError, require_extra

    try:
        require_extra(feature, extra, *modules)
    except MissingExtraError as exc:
        _fail(escape(str(exc)))  # "[serve]" is not markup


def _expected_errors(*more: type[BaseException]) -> tuple[type[BaseException], ...]:
    """The errors a command reports as one line (its message) rather than a traceback, and ``more``."""
    from pv2tea.config import ConfigError
    from pv2tea.data.images import ImageLoadError
    from pv2tea.data.schema import DataValidationError
    from pv2tea.eval.normalize import SynonymFileError
    from pv2tea.models.checkpoint import CheckpointError
    from pv2tea.models.weights import WeightLoadError
    from pv2tea.train.loop import TrainingError

    return (
        *more,
        ConfigError,
        DataValidationError,
        WeightLoadError,
        CheckpointError,
        TrainingError,
        ImageLoadError,
        SynonymFileError,
        FileNotFoundError,
        ValueError,
    )


# --device and --precision of predict and serve
DeviceOption = Annotated[
    str, typer.Option("--device", help="auto (a CUDA GPU if torch sees one, else the CPU), cpu, cuda, cuda:N or mps.")
]
PrecisionOption = Annotated[
    str,
    typer.Option(
        "--precision",
        help="fp32, bf16 (autocast; fast on CPUs with AMX or AVX-512 BF16 and on GPUs) or fp16 (GPUs only).",
    ),
]
EVALUATE_CHUNK_ROWS = 4096  # rows `pv2tea evaluate` holds at a time


def _load(path: Path, skip_invalid: bool, require_label: bool = True):
    from pv2tea.data.validate import load_dataset

    result = load_dataset(path, skip_invalid=skip_invalid, require_label=require_label)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    if result.n_skipped:
        console.print(
            f"[yellow]skipped {result.n_skipped} invalid row(s) of {escape(str(path))}[/] (see data_report.json)"
        )
    return result


def _scan(path: Path, skip_invalid: bool, require_label: bool = True):
    """Check a dataset file in one streaming pass (for commands that then stream its records with
    ``iter_records(path, skip_rows=scan.bad_rows)``); says what ``_load`` says about it."""
    from pv2tea.data.schema import DataValidationError
    from pv2tea.data.validate import scan_dataset

    scan = scan_dataset(path, require_label=require_label)
    if scan.errors and not skip_invalid:
        raise DataValidationError(scan.errors)
    for warning in scan.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    if scan.bad_rows:
        console.print(f"[yellow]skipped {len(scan.bad_rows)} invalid row(s) of {escape(str(path))}[/]")
    return scan


# Rows weak-label reads, labels and writes at a time.
WEAK_LABEL_CHUNK = 4096


def _require_gold(path: Path, records, why: str) -> None:
    """Stop with a message naming the file and its first row without a gold value, if any."""
    missing = [r.id for r in records if not r.gold]
    if missing:
        _fail(f"{path}: {len(missing)} row(s) have no 'gold' value (first: {missing[0]}); {why}")


def _read_candidates(path: Path | None) -> dict | None:
    """Candidate value lists from JSON; a clear error naming the file when malformed."""
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"candidates file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"candidates file {path}: expected a JSON object")
    return data


def _load_extractor(path: Path | None):
    """A saved text extractor for --extractor fusion (its libraries are imported only then)."""
    if path is None:
        return None
    from pv2tea.baselines import load_extractor

    return load_extractor(path)


def _load_calibration(path: Path | None, model: Path, extractor: Path | None):
    """A calibration file for predict/serve; it needs the extractor, and a warning when it was made for another
    model."""
    if path is None:
        return None
    if extractor is None:
        raise ValueError(
            "--calibration weighs the model against a text extractor: it needs --extractor (and --candidates)"
        )
    from pv2tea.decoding.calibration import load_calibration
    from pv2tea.models.checkpoint import warm_start_fingerprint

    calibration = load_calibration(path)
    made_for = calibration.meta.get("model_sha256")
    if made_for and made_for != warm_start_fingerprint(model):
        console.print(
            f"[yellow]warning:[/] {escape(str(path))} was calibrated for another model "
            f"({escape(str(calibration.meta.get('model')))}); run pv2tea calibrate for {escape(str(model))}",
            highlight=False,
        )
    return calibration


def _data_report(*results) -> dict:
    return {
        r.path: {
            "rows_loaded": len(r.records),
            "rows_skipped": r.n_skipped,
            "skipped": [str(e) for e in r.skipped],
            "warnings": r.warnings,
        }
        for r in results
    }


@app.command()
def train(
    train_file: Annotated[Path, typer.Option("--train", help="Training data (JSONL/CSV/Parquet) with weak labels.")],
    out: Annotated[Path, typer.Option("--out", help="Run directory (config, metrics, logs, checkpoints).")],
    val_file: Annotated[Path | None, typer.Option("--val", help="Validation data, scored each epoch.")] = None,
    config: Annotated[
        str | None, typer.Option("--config", "-c", help="Preset name (cpu, paper) or YAML file.")
    ] = "cpu",
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Dotted override, e.g. optim.lr=1e-4.")] = None,
    variant: Annotated[
        str | None,
        typer.Option(
            "--variant",
            help="A variant of `pv2tea experiment` (e.g. tea: text only, the warm start of a later run), "
            "applied before --set.",
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out exactly where it stopped.")
    ] = False,
    skip_invalid: Annotated[
        bool, typer.Option("--skip-invalid", help="Skip bad rows and count them in the run report.")
    ] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Train PV2TEA on weakly labelled products (on several processes under torchrun or accelerate launch)."""
    _quiet_libraries()
    from pv2tea.config import load_config, upgrade_saved
    from pv2tea.experiment import VARIANTS
    from pv2tea.train.loop import train as run_training

    if variant is not None and variant not in VARIANTS:
        _fail(f"--variant {variant!r} is not a variant; known: {', '.join(VARIANTS)}")
    try:
        if resume:
            saved = out / "config.yaml"
            if not saved.is_file():
                _fail(f"cannot resume: {saved} not found (was --out the run directory?)")
            import yaml

            cfg = load_config(None, overrides, base=upgrade_saved(yaml.safe_load(saved.read_text())))
        else:
            if (out / "checkpoint").exists():
                _fail(f"{out} already holds a run; pass --resume to continue it or choose another --out")
            cfg = load_config(config, [*(VARIANTS[variant] if variant else []), *(overrides or [])])
        train_data = _load(train_file, skip_invalid)
        val_data = _load(val_file, skip_invalid) if val_file else None
        results = [train_data] + ([val_data] if val_data else [])
        result = run_training(
            cfg,
            train_data.records,
            out,
            val_data.records if val_data else [],
            resume=resume,
            progress=progress,
            data_report=_data_report(*results),
        )
    except _expected_errors() as exc:
        _fail(str(exc))
    if os.environ.get("RANK", "0") != "0":  # under torchrun / accelerate launch: rank 0 reports
        return
    console.print(f"trained in {result.seconds:.0f} s; model: {result.final_dir}")
    if result.val_report:
        from pv2tea.eval.report import format_report_table

        out_console.print(format_report_table(result.val_report, title="validation"), highlight=False)


@app.command()
def evaluate(
    model: Annotated[Path, typer.Option("--model", "-m", help="Checkpoint folder (a run's final/ or checkpoint/).")],
    data: Annotated[Path, typer.Option("--data", help="Products with gold values (and sources).")],
    out: Annotated[Path | None, typer.Option("--out", help="Where to write the JSON report.")] = None,
    synonyms: Annotated[Path | None, typer.Option("--synonyms", help="JSON/YAML synonym map.")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    num_beams: Annotated[int | None, typer.Option(min=1)] = None,
    candidates: Annotated[
        Path | None,
        typer.Option(
            "--candidates",
            help="JSON {category: {attribute: [values]}} or {attribute: [values]}: rank these instead of free generation.",
        ),
    ] = None,
    skip_invalid: Annotated[bool, typer.Option("--skip-invalid")] = False,
) -> None:
    """Score a model against gold values: P/R/F1 overall, by source (text/image) with the GAP, per attribute.

    The file is read as a stream (checked in full first, then predicted a chunk at a time): memory holds one chunk
    of products and, per row, only its gold and predicted values.
    """
    _quiet_libraries()
    from itertools import islice

    from pv2tea.data.validate import iter_records
    from pv2tea.eval.metrics import Example, source_aware_report
    from pv2tea.eval.normalize import load_synonyms
    from pv2tea.eval.report import format_report_table, write_report
    from pv2tea.inference.predictor import Predictor
    from pv2tea.models import checkpoint as ckpt

    try:
        syn = load_synonyms(synonyms) if synonyms else None
        scan = _scan(data, skip_invalid, require_label=False)
        missing, first = 0, ""
        for _, r in iter_records(data, skip_rows=scan.bad_rows, require_label=False):
            if not r.gold:
                missing, first = missing + 1, first or r.id
        if missing:
            _fail(f"{data}: {missing} row(s) have no 'gold' value (first: {first}); evaluation needs gold")
        if not scan.n_valid:
            _fail(f"{data}: no valid rows to evaluate")
        multi = {**ckpt.read_json(model, ckpt.PREPROCESS_FILE).get("multi_value", {})}
        predictor = Predictor.from_checkpoint(model)
        cands = _read_candidates(candidates)
        scored: list[tuple[tuple[str, ...], tuple[str, ...], str | None, str]] = []  # gold, pred, source, attribute
        stream = (r for _, r in iter_records(data, skip_rows=scan.bad_rows, require_label=False))
        while chunk := list(islice(stream, EVALUATE_CHUNK_ROWS)):
            preds = predictor.predict(chunk, batch_size, num_beams, progress=True, candidates=cands)
            for r, p in zip(chunk, preds):
                scored.append((tuple(r.gold or ()), tuple(p), r.source, r.attribute))
                several = len(r.label) > 1 or len(r.gold or ()) > 1  # as train.loop.multi_value_attributes
                multi[r.attribute] = multi.get(r.attribute, False) or several
        examples = [Example(g, p, src, attr, multi.get(attr, False)) for g, p, src, attr in scored]
        report = source_aware_report(examples, syn)
        report["skipped_rows"] = len(scan.bad_rows)
    except _expected_errors() as exc:
        _fail(str(exc))
    if out:
        write_report(report, out)
        console.print(f"report written to {out}")
    out_console.print(format_report_table(report, title=f"{model} on {data}"), highlight=False)


@app.command()
def predict(
    model: Annotated[Path, typer.Option("--model", "-m", help="Checkpoint folder.")],
    data: Annotated[Path, typer.Option("--data", help="Products (label/gold not needed).")],
    out: Annotated[Path, typer.Option("--out", help="Output JSONL: one line per row with the predicted values.")],
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    num_beams: Annotated[int | None, typer.Option(min=1)] = None,
    candidates: Annotated[
        Path | None,
        typer.Option(
            "--candidates",
            help="JSON {category: {attribute: [values]}} or {attribute: [values]}: rank these instead of free generation.",
        ),
    ] = None,
    skip_invalid: Annotated[bool, typer.Option("--skip-invalid")] = False,
    keep_grounded: Annotated[
        bool,
        typer.Option(
            "--keep-grounded",
            help="Keep a row's label (e.g. from a text extractor) when its text states it; the model answers the other rows.",
        ),
    ] = False,
    chunk_size: Annotated[int, typer.Option(min=1, help="Rows predicted and flushed to OUT.partial at a time.")] = 4096,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue an interrupted run from OUT.partial (under torchrun: from the OUT.part-R-of-N files, on as many processes).",
        ),
    ] = False,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "fp32",
    extractor: Annotated[
        Path | None,
        typer.Option(
            "--extractor",
            help="A saved text extractor (pv2tea weak-label ... --save DIR): rank each row's candidates by the model's likelihood times the extractor's probability (needs --candidates).",
        ),
    ] = None,
    extractor_weight: Annotated[
        float,
        typer.Option(
            min=0.0, help="Weight of the extractor's log-probability in --extractor fusion (0: the model alone)."
        ),
    ] = 1.0,
    calibration: Annotated[
        Path | None,
        typer.Option(
            "--calibration",
            help="Per-attribute model shares from pv2tea calibrate (needs --extractor and --candidates; replaces --extractor-weight).",
        ),
    ] = None,
    feature_cache: Annotated[
        Path | None,
        typer.Option(
            "--feature-cache",
            help="A feature cache folder of this model's frozen backbone(s) (pv2tea cache build): rows found in it are not encoded again; one of another backbone is refused.",
        ),
    ] = None,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Show a progress bar of the rows predicted.")
    ] = True,
) -> None:
    """Extract attribute values for every row and write them as JSON Lines (chunk by chunk; resumable).

    The file is read as a stream: every row is checked first, then the rows are predicted a chunk at a time. Under
    torchrun (torchrun --nproc_per_node N --no-python pv2tea predict ...) each process predicts every N-th row into
    its own part and the first merges the parts into OUT in input order.
    """
    _quiet_libraries()
    from pv2tea.cache.store import FeatureCacheError
    from pv2tea.data.readers import check_table
    from pv2tea.data.schema import DataValidationError
    from pv2tea.decoding.fusion import check_fusion
    from pv2tea.inference.device import autocast_for, resolve_device
    from pv2tea.inference.predictor import Predictor
    from pv2tea.inference.sharded import JobError, check_leftovers, launched_shard, predict_file, process_group
    from pv2tea.models.checkpoint import checkpoint_warnings_to

    def note(message: str) -> None:  # a warning about the model folder, said once (by rank 0 under torchrun)
        if shard is None or shard.rank == 0:
            console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)

    def check_input(scan) -> None:
        if keep_grounded and not scan.n_labelled:
            raise ValueError(
                f"{data}: --keep-grounded needs the rows' existing values in a 'label' field; no row has one"
            )

    shard = None
    try:
        check_table(data)  # a missing, unknown or empty file is refused before the model loads
        shard = launched_shard()
        check_leftovers(out, shard, resume)  # before the model loads
        check_fusion(candidates, extractor)
        where = resolve_device(device)
        autocast_for(precision, where)  # refuse a bad --precision before the model loads
        calib = _load_calibration(calibration, model, extractor)
        text_extractor = _load_extractor(extractor)
        with checkpoint_warnings_to(note):
            predictor = Predictor.from_checkpoint(model, device=where, precision=precision)
        if feature_cache is not None:
            from pv2tea.cache.build import open_for_model

            predictor.pre.cache = open_for_model(feature_cache, predictor.model, predictor.pre)
        with process_group(shard):
            result = predict_file(
                predictor,
                data,
                out,
                shard=shard,
                skip_invalid=skip_invalid,
                resume=resume,
                check_input=check_input,
                batch_size=batch_size,
                num_beams=num_beams,
                candidates=_read_candidates(candidates),
                keep_grounded=keep_grounded,
                chunk_size=chunk_size,
                extractor=text_extractor,
                extractor_weight=extractor_weight,
                calibration=calib,
                progress=progress,
            )
    except _expected_errors(FeatureCacheError) as exc:
        if shard is not None and shard.rank > 0:
            if isinstance(exc, (DataValidationError, JobError)):  # every rank has it: rank 0 says it
                raise typer.Exit(2) from None
            _fail(f"rank {shard.rank}: {exc}")
        _fail(str(exc))
    if shard.rank > 0:
        return
    for warning in result.scan.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    skipped = len(result.scan.bad_rows)
    console.print(
        f"{result.written + result.resumed} prediction(s) written to {out}"
        + (f" by {shard.world_size} processes" if shard.world_size > 1 else "")
        + (f" ({result.resumed} from the interrupted run)" if result.resumed else "")
        + (f"; {result.kept} grounded label(s) kept" if keep_grounded else "")
        + (f"; {skipped} invalid row(s) of {escape(str(data))} skipped" if skipped else "")
    )


@app.command()
def serve(
    model: Annotated[Path, typer.Option("--model", "-m", help="Checkpoint folder.")],
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    image_root: Annotated[
        Path | None,
        typer.Option(
            "--image-root",
            help="Folder whose files requests may name in 'image_paths' (default: inline images only); paths and symlinks leaving it are refused.",
        ),
    ] = None,
    candidates: Annotated[
        Path | None,
        typer.Option(
            "--candidates",
            help="JSON {category: {attribute: [values]}} or {attribute: [values]}: rank these instead of free generation.",
        ),
    ] = None,
    batch_size: Annotated[
        int,
        typer.Option(
            "--max-batch",
            "--batch-size",
            min=1,
            help="Most rows in one model batch; concurrent requests are coalesced up to it.",
        ),
    ] = 32,
    max_wait_ms: Annotated[
        float, typer.Option("--max-wait-ms", min=0.0, help="How long a batch waits for more requests before it runs.")
    ] = 5.0,
    batching: Annotated[
        bool,
        typer.Option(
            "--batching/--no-batching", help="Coalesce concurrent requests (off: one request per model batch)."
        ),
    ] = True,
    max_queue: Annotated[
        int,
        typer.Option("--max-queue", min=1, help="Requests that may wait for the model; beyond, 503 with Retry-After."),
    ] = 256,
    request_timeout: Annotated[
        float, typer.Option("--request-timeout", min=0.001, help="Seconds before a request is answered 504.")
    ] = 30.0,
    max_products: Annotated[int, typer.Option(min=1, help="Most products one request may carry (413).")] = 1024,
    max_body_bytes: Annotated[int, typer.Option("--max-body-bytes", min=1, help="Largest request body (413).")] = 64
    * 2**20,
    max_text_chars: Annotated[
        int, typer.Option("--max-text-chars", min=1, help="Longest product text, in characters (422).")
    ] = 20_000,
    max_images: Annotated[
        int, typer.Option("--max-images", min=1, help="Most images per product, inline and by path (422).")
    ] = 8,
    max_image_bytes: Annotated[
        int, typer.Option("--max-image-bytes", min=1, help="Largest encoded image file (422).")
    ] = 20 * 2**20,
    max_image_pixels: Annotated[
        int,
        typer.Option(
            "--max-image-pixels",
            min=1,
            help="Most pixels (width × height) of one image, read from its header before decoding (422).",
        ),
    ] = 40_000_000,
    image_formats: Annotated[
        str, typer.Option("--image-formats", help="Comma-separated image formats allowed (Pillow names) (422).")
    ] = "JPEG,PNG,WEBP,GIF,BMP,TIFF",
    max_aspect_ratio: Annotated[
        float,
        typer.Option(
            "--max-aspect-ratio", min=1.0, help="Longest side / shortest side of one image, read from its header (422)."
        ),
    ] = 20.0,
    max_field_chars: Annotated[
        int,
        typer.Option(
            "--max-field-chars",
            min=1,
            help="Longest id, category, attribute, label value or image path, in characters (422).",
        ),
    ] = 1_000,
    max_labels: Annotated[
        int, typer.Option("--max-labels", min=1, help="Most values in one product's label (422).")
    ] = 100,
    max_decoded_bytes: Annotated[
        int,
        typer.Option(
            "--max-decoded-bytes",
            min=1,
            help="Bytes of decoded images the requests in flight may hold together (a request needing more: 413; "
            "one not fitting beside the others: 503).",
        ),
    ] = 2**30,
    header_timeout: Annotated[
        float,
        typer.Option(
            "--header-timeout",
            min=0.001,
            help="Seconds a connection may take to send a request's headers; then 408 and closed.",
        ),
    ] = 10.0,
    body_timeout: Annotated[
        float,
        typer.Option(
            "--body-timeout", min=0.001, help="Seconds a request's body may take to arrive; then 408 and closed."
        ),
    ] = 60.0,
    max_connections: Annotated[
        int,
        typer.Option("--max-connections", min=1, help="Open connections; a request beyond them is answered 503."),
    ] = 512,
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, help="Image-decoding threads (default: one per core).")
    ] = None,
    api_key_file: Annotated[
        Path | None,
        typer.Option(
            "--api-key-file",
            help="File holding an API key that /predict and /metrics require (or set PV2TEA_API_KEY); /health and /ready stay open.",
        ),
    ] = None,
    log_level: Annotated[
        str, typer.Option("--log-level", help="uvicorn's log level (warning: no access log).")
    ] = "info",
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            min=1,
            help="torch threads of the model (default: torch's; 1 on a machine shared with other jobs).",
        ),
    ] = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "fp32",
    extractor: Annotated[
        Path | None,
        typer.Option(
            "--extractor",
            help="A saved text extractor: rank candidates by the model and the extractor together (needs --candidates).",
        ),
    ] = None,
    extractor_weight: Annotated[
        float, typer.Option(min=0.0, help="Weight of the extractor's log-probability in --extractor fusion.")
    ] = 1.0,
    calibration: Annotated[
        Path | None,
        typer.Option(
            "--calibration",
            help="Per-attribute model shares from pv2tea calibrate (needs --extractor and --candidates; replaces --extractor-weight).",
        ),
    ] = None,
) -> None:
    """Serve a model over HTTP: POST /predict, GET /health, /ready, /metrics (API description at /docs).

    SIGTERM finishes the requests in flight, refuses new connections and exits 0.
    """
    _quiet_libraries()
    _need_extra("serve", "serve", "fastapi", "uvicorn", "prometheus_client")
    import signal
    import threading

    import torch
    import uvicorn

    from pv2tea.decoding.fusion import check_fusion
    from pv2tea.inference.device import autocast_for, resolve_device
    from pv2tea.inference.predictor import Predictor
    from pv2tea.inference.server import create_app
    from pv2tea.models.checkpoint import checkpoint_warnings_to
    from pv2tea.serve.connections import is_loopback, uvicorn_options
    from pv2tea.serve.limits import Limits

    if threads is not None:
        torch.set_num_threads(threads)
    if image_root is not None and not image_root.is_dir():
        _fail(f"--image-root {image_root}: not a folder")
    api_key = os.environ.get("PV2TEA_API_KEY") or None
    if api_key_file is not None:
        if not api_key_file.is_file():
            _fail(f"--api-key-file {api_key_file}: no such file")
        api_key = api_key_file.read_text().strip()
        if not api_key:
            _fail(f"--api-key-file {api_key_file} is empty")
    if api_key is None and not is_loopback(host):
        console.print(
            f"[yellow]warning:[/] --host {escape(host)} listens beyond this machine and no API key is set: anyone "
            "who can reach the port may call /predict and read /metrics; give --api-key-file FILE (or set "
            "PV2TEA_API_KEY), or keep the default --host 127.0.0.1 behind a proxy that checks callers",
            highlight=False,
        )
    try:
        check_fusion(candidates, extractor)
        limits = Limits(
            max_body_bytes=max_body_bytes,
            max_products=max_products,
            max_text_chars=max_text_chars,
            max_images_per_product=max_images,
            max_image_bytes=max_image_bytes,
            max_image_pixels=max_image_pixels,
            formats=tuple(image_formats.split(",")),
            max_aspect_ratio=max_aspect_ratio,
            max_field_chars=max_field_chars,
            max_labels=max_labels,
            max_decoded_bytes=max_decoded_bytes,
            header_timeout=header_timeout,
            body_timeout=body_timeout,
            max_connections=max_connections,
        )
        where = resolve_device(device)
        autocast_for(precision, where)  # refuse a bad --precision before the model loads
        with checkpoint_warnings_to(lambda m: console.print(f"[yellow]warning:[/] {escape(m)}", highlight=False)):
            predictor = Predictor.from_checkpoint(model, device=where, precision=precision)
        cands = _read_candidates(candidates)
        app_ = create_app(
            predictor,
            model_name=str(model),
            candidates=cands,
            image_root=image_root,
            batch_size=batch_size,
            limits=limits,
            max_wait_ms=max_wait_ms,
            max_queue=max_queue,
            request_timeout=request_timeout,
            batching=batching,
            api_key=api_key,
            workers=workers,
            extractor=_load_extractor(extractor),
            extractor_weight=extractor_weight,
            calibration=_load_calibration(calibration, model, extractor),
        )
    except _expected_errors() as exc:
        _fail(str(exc))
    console.print(
        f"serving {model} on http://{host}:{port} (POST /predict, GET /health /ready /metrics, docs at "
        f"/docs){'; API key required' if api_key else ''}",
        highlight=False,
    )
    # uvicorn answers SIGTERM by finishing the requests in flight and closing the socket, then raises the signal
    # again to exit; a handler of ours takes that second one, so a graceful stop exits 0
    stopped: list[int] = []
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: stopped.append(sig)) if main_thread else None
    try:
        uvicorn.run(
            app_,
            host=host,
            port=port,
            log_level=log_level,
            timeout_graceful_shutdown=int(request_timeout) + 5,
            **uvicorn_options(limits),
        )
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    if stopped:
        console.print("SIGTERM: the requests in flight were answered; stopped", highlight=False)


@data_app.command("synth")
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


@data_app.command("validate")
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
        _fail(str(exc))
    for warning in warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    if errors:
        for error in errors:
            out_console.print(str(error), highlight=False)
        rows = len({e.row for e in errors})
        _fail(f"{len(errors)} problem(s) in {rows} row(s) of {file}", code=1)
    out_console.print(f"{file}: all rows valid")


import_app = typer.Typer(
    no_args_is_help=True, help="Convert ImplicitAVE or a Fashion Product Images catalogue into pv2tea's row format."
)
data_app.add_typer(import_app, name="import")


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
    except _expected_errors() as exc:
        _fail(str(exc))
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
    except _expected_errors() as exc:
        _fail(str(exc))
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


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the catalog and the run.")] = Path("demo_out"),
    n_products: Annotated[int, typer.Option(min=20)] = 500,
    epochs: Annotated[int | None, typer.Option(min=1, help="Default: the cpu preset's.")] = None,
    seed: int = 0,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Extra dotted config overrides.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Synthetic catalog → train PV2TEA on weak text labels → source-aware comparison on gold."""
    _quiet_libraries()
    from pv2tea.config import load_config
    from pv2tea.data.synth import make_catalog
    from pv2tea.eval.metrics import source_aware_report
    from pv2tea.eval.report import compare_table, format_report_table, write_report
    from pv2tea.experiment import gold_examples, keep_grounded_report
    from pv2tea.inference.predictor import Predictor
    from pv2tea.regularize.grounding import keep_grounded
    from pv2tea.train.loop import evaluate_records, multi_value_attributes
    from pv2tea.train.loop import train as run_training

    t0 = time.time()
    try:
        paths = make_catalog(out / "catalog", n_products=n_products, seed=seed, image_size=128)
        console.print(f"synthetic catalog: {out / 'catalog'} ({time.time() - t0:.1f} s)")
        epoch_set = [f"train.epochs={epochs}"] if epochs else []
        cfg = load_config("cpu", [*epoch_set, f"train.seed={seed}", *(overrides or [])])
        train_data, val_data, test_data = (_load(paths[k], False) for k in ("train", "val", "test"))
        run_dir = out / "run"
        if (run_dir / "checkpoint").exists():
            _fail(f"{run_dir} already holds a run; remove it or choose another --out")
        t1 = time.time()
        result = run_training(
            cfg,
            train_data.records,
            run_dir,
            val_data.records,
            progress=progress,
            data_report=_data_report(train_data, val_data),
        )
        train_seconds = time.time() - t1
        predictor = Predictor.from_checkpoint(result.final_dir)
        records = test_data.records
        multi = multi_value_attributes(records)
        model_report, preds = evaluate_records(
            predictor.model, predictor.pre, records, cfg.train.eval_batch_size, multi
        )
        weak_report = source_aware_report(gold_examples(records, [r.label for r in records], multi))
        kept = keep_grounded(records, preds)
        kept_report = keep_grounded_report(records, preds, multi)
    except _expected_errors() as exc:
        _fail(str(exc))
    write_report(model_report, run_dir / "test_report.json")
    write_report(weak_report, run_dir / "weak_labels_test_report.json")
    write_report(kept_report, run_dir / "keep_grounded_test_report.json")
    with open(run_dir / "test_predictions.jsonl", "w") as f:
        for r, p, k in zip(records, preds, kept):
            f.write(
                json.dumps(
                    {
                        "id": r.id,
                        "gold": list(r.gold),
                        "weak_label": list(r.label),
                        "pred": p,
                        "pred_keep_grounded": k,
                        "source": r.source,
                    }
                )
                + "\n"
            )
    out_console.print(
        format_report_table(model_report, title="PV2TEA on the test split (gold values)"), highlight=False
    )
    out_console.print(
        compare_table(
            {"weak text labels": weak_report, "PV2TEA": model_report, "PV2TEA + kept labels": kept_report},
            metrics=("f1", "accuracy"),
            title="vs the text-rule weak labels it was trained on (+ kept labels: a weak "
            "label its text states is kept, PV2TEA answers the rest)",
        ),
        highlight=False,
    )
    out_console.print(
        f"catalog {n_products} products, train rows {len(train_data.records)}, "
        f"test rows {len(records)}; training {train_seconds:.0f} s, total {time.time() - t0:.0f} s "
        f"on {os.cpu_count()} CPU core(s)",
        highlight=False,
    )


def _print_confidence(labelled: Sequence[Record], multi: dict[str, bool]) -> None:
    """How well the extractor's confidence (the rows' label_weight) tells its right labels from its wrong ones."""
    from pv2tea.eval.metrics import Example, confidence_reliability, is_correct

    rows = [(r, r.gold, r.label_weight) for r in labelled if r.gold is not None and r.label_weight is not None]
    right = [is_correct(Example(gold, r.label, r.source, r.attribute, multi[r.attribute])) for r, gold, _ in rows]
    result = confidence_reliability([weight for _, _, weight in rows], right)
    auc = "undefined (all right or all wrong)" if result["auc"] is None else f"{result['auc']:.3f}"
    out_console.print(
        f"extractor confidence (label_weight) vs its labels being right, {len(rows)} gold row(s): ROC AUC {auc}",
        highlight=False,
    )
    for b in result["bins"]:
        accuracy = "–" if b["accuracy"] is None else f"{b['accuracy']:.1f}"
        out_console.print(
            f"  confidence {b['low']:.2f}–{b['high']:.2f}: {b['n']:5d} row(s), accuracy {accuracy}", highlight=False
        )


@app.command("weak-label")
def weak_label_cmd(
    train_file: Annotated[Path, typer.Option("--train", help="Text-only labelled data to train the extractor on.")],
    data: Annotated[Path, typer.Option("--data", help="Multimodal products to label.")],
    out: Annotated[Path, typer.Option("--out", help="Output dataset (JSONL/CSV/Parquet) with weak labels.")],
    kind: Annotated[str, typer.Option(help="transformer (OpenTag_cls-style) or tfidf.")] = "transformer",
    text_path: Annotated[str | None, typer.Option(help="Local BERT-style checkpoint for the transformer.")] = None,
    epochs: Annotated[int | None, typer.Option(min=1)] = None,
    load: Annotated[Path | None, typer.Option("--load", help="Use a saved extractor instead of training.")] = None,
    save: Annotated[Path | None, typer.Option("--save", help="Save the trained extractor here.")] = None,
    skip_invalid: Annotated[bool, typer.Option("--skip-invalid")] = False,
    soft_train: Annotated[
        Path | None,
        typer.Option(
            "--soft-train",
            help="Also write the --train rows here with the extractor's out-of-fold class probabilities as soft "
            "labels (label_probs), for a warm start trained with --set loss.soft_label_weight.",
        ),
    ] = None,
    soft_folds: Annotated[int, typer.Option(min=2, help="Folds of --soft-train's cross-fitting.")] = 5,
) -> None:
    """Train (or load) a text-established extractor and write its predictions as weak labels.

    --data is read as a stream (checked first, then labelled and written a chunk at a time); its rows with gold
    values are kept in memory for the report. --soft-train fits --soft-folds more extractors, each scoring the
    --train rows the others trained on (an extractor scoring its own training rows gives almost their labels back).
    """
    _quiet_libraries()
    import dataclasses
    from itertools import islice

    from pv2tea.baselines import (
        TextExtractorConfig,
        TfidfExtractorConfig,
        TfidfTextExtractor,
        TransformerTextExtractor,
        evaluate_extractor,
        load_extractor,
        soft_labelled,
        weak_label,
    )
    from pv2tea.data.readers import RecordWriter
    from pv2tea.data.validate import iter_records
    from pv2tea.eval.report import format_report_table
    from pv2tea.train.loop import multi_value_attributes

    if load and soft_train:
        _fail("--soft-train fits extractors on --train: it cannot be used with --load")

    def make_extractor():
        if kind == "tfidf":
            return TfidfTextExtractor(TfidfExtractorConfig())
        if kind == "transformer":
            cfg = TextExtractorConfig(progress=True)
            changes: dict[str, Any] = {
                k: v for k, v in {"text_path": text_path, "epochs": epochs}.items() if v is not None
            }
            return TransformerTextExtractor(dataclasses.replace(cfg, **changes))
        _fail(f"--kind must be transformer or tfidf, got {kind}")

    try:
        scan = _scan(data, skip_invalid, require_label=False)
        if load:
            extractor = load_extractor(load)
        else:
            source = _load(train_file, skip_invalid)
            extractor = make_extractor().fit(source.records)
            if save:
                extractor.save(save)
            if soft_train:
                from pv2tea.data.folds import product_folds
                from pv2tea.data.readers import write_records

                folds = product_folds(source.records, soft_folds)
                write_records(soft_labelled(make_extractor, source.records, folds), soft_train)
                console.print(
                    f"{len(source.records)} --train row(s) written to {soft_train} with out-of-fold soft labels "
                    f"({soft_folds} folds; train a warm start on them with --set loss.soft_label_weight=0.5)"
                )
        gold: list[Record] = []
        gold_labelled: list[Record] = []
        rows = (record for _, record in iter_records(data, skip_rows=scan.bad_rows, require_label=False))
        with RecordWriter(out) as writer:
            while chunk := list(islice(rows, WEAK_LABEL_CHUNK)):
                labelled = weak_label(extractor, chunk)
                writer.write(labelled)
                gold.extend(r for r in chunk if r.gold)
                gold_labelled.extend(r for r in labelled if r.gold)
        console.print(
            f"{writer.written} weakly labelled row(s) written to {out} (label_weight: the extractor's "
            "confidence; training weighs the rows by it with --set schemes.label_weights=true)"
        )
        if gold:
            multi = multi_value_attributes(gold)
            report = evaluate_extractor(extractor, gold, multi)
            out_console.print(format_report_table(report, title="text extractor vs gold"), highlight=False)
            _print_confidence(gold_labelled, multi)
    except _expected_errors() as exc:
        _fail(str(exc))


def _parse_grid(grid: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in grid.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--grid must be comma-separated numbers in [0, 1], got {grid!r}") from None


@app.command()
def calibrate(
    model: Annotated[Path, typer.Option("--model", "-m", help="Checkpoint folder (a run's final/).")],
    extractor: Annotated[
        Path,
        typer.Option(
            "--extractor",
            help="The saved text extractor the model is deployed next to (pv2tea weak-label ... --save DIR).",
        ),
    ],
    data: Annotated[
        Path,
        typer.Option(
            "--data", help="A gold sample: products with 'gold' values the model did not train on (a few hundred rows)."
        ),
    ],
    candidates: Annotated[
        Path,
        typer.Option(
            "--candidates",
            help="JSON {category: {attribute: [values]}} or {attribute: [values]}: the closed value lists ranked.",
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Where to write the calibration (JSON); pass it to predict --calibration.")
    ] = Path("calibration.json"),
    z: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Guard: keep the model's share on an attribute only when (fixed - broke) >= z * sqrt(fixed + broke) on the sample.",
        ),
    ] = 1.0,
    min_rows: Annotated[
        int, typer.Option(min=1, help="Attributes with fewer sample rows take the share chosen on the whole sample.")
    ] = 20,
    grid: Annotated[
        str, typer.Option(help="Model shares tried (0: the extractor alone, 1: the model alone).")
    ] = "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1",
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    skip_invalid: Annotated[bool, typer.Option("--skip-invalid")] = False,
) -> None:
    """Per attribute, how far to trust the model against the extractor, from a small gold sample; where the model
    does not beat the extractor beyond noise, the extractor's answer is kept."""
    _quiet_libraries()
    from rich.table import Table

    from pv2tea.decoding.calibration import CalibrationConfig, fit_calibration, scored_rows, today
    from pv2tea.inference.predictor import Predictor
    from pv2tea.models.checkpoint import warm_start_fingerprint

    try:
        config = CalibrationConfig(grid=_parse_grid(grid), z=z, min_rows=min_rows)
        dataset = _load(data, skip_invalid, require_label=False)
        records = dataset.records
        _require_gold(data, records, "calibration compares the answers with gold values")
        cands = _read_candidates(candidates)
        if cands is None:
            raise ValueError("calibration ranks candidate lists: it needs --candidates")
        text_extractor = _load_extractor(extractor)
        predictor = Predictor.from_checkpoint(model)
        scores = predictor.candidate_log_probs(records, cands, batch_size)
        rows, left_out = scored_rows(records, scores, text_extractor.value_probabilities(records))
        if left_out:
            attrs = sorted({records[i].attribute for i in left_out})
            console.print(
                f"[yellow]warning:[/] {len(left_out)} row(s) of {escape(str(data))} have no candidate "
                f"list in {escape(str(candidates))} and are not used (attributes: "
                f"{escape(', '.join(attrs[:5]))}{' …' if len(attrs) > 5 else ''}); they keep the model's "
                "free answer at prediction",
                highlight=False,
            )
        calibration = fit_calibration(
            rows,
            config,
            meta={
                "created": today(),
                "model": str(model),
                "model_sha256": warm_start_fingerprint(model),
                "extractor": str(extractor),
                "sample": str(data),
                "sample_rows": len(rows),
                "rows_without_candidates": len(left_out),
                "skipped_rows": dataset.n_skipped,
            },
        )
        calibration.save(out)
    except _expected_errors() as exc:
        _fail(str(exc))
    table = Table(title=f"calibration on {len(rows)} gold row(s) of {data}", show_edge=False)
    for col in ("attribute", "rows", "extractor acc", "best λ", "fused acc", "fixed", "broke", "λ deployed"):
        table.add_column(col, justify="left" if col == "attribute" else "right")
    for name, c in [*sorted(calibration.attributes.items()), ("(whole sample)", calibration.pooled)]:
        acc = _percent_of(c.rows)
        deployed = f"{c.model_weight:g}" + (" (pooled)" if c.source == "pooled" and name != "(whole sample)" else "")
        if c.best_weight > 0 and not c.accepted:
            deployed += " (guard)"
        table.add_row(
            name,
            str(c.rows),
            acc(c.extractor_correct),
            f"{c.best_weight:g}",
            acc(c.fused_correct),
            str(c.fixed),
            str(c.broke),
            deployed,
        )
    out_console.print(table)
    console.print(
        f"calibration written to {out}: λ is the model's share (0: the extractor's answer is kept); use it "
        f"with pv2tea predict --extractor {extractor} --candidates {candidates} --calibration {out}"
    )


@app.command()
def experiment(
    train_file: Annotated[Path, typer.Option("--train", help="Training data with weak labels.")],
    val_file: Annotated[Path, typer.Option("--val", help="Validation data.")],
    test_file: Annotated[Path, typer.Option("--test", help="Test data with gold values (and sources).")],
    out: Annotated[Path, typer.Option("--out", help="Experiment folder (re-run to resume).")],
    variants: Annotated[
        str, typer.Option(help="Comma-separated variants, or 'all'.")
    ] = "weak_labels,text_extractor,tea,pv2tea",
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per variant (0..N-1).")] = 3,
    config: Annotated[str | None, typer.Option("--config", "-c")] = "cpu",
    overrides: Annotated[list[str] | None, typer.Option("--set")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = False,
) -> None:
    """Train every variant over seeds; write Table 2/3/7-style tables, t-tests and retrieval."""
    _quiet_libraries()
    from pv2tea.experiment import Split, known_variants, run_experiment

    names = known_variants() if variants == "all" else [v.strip() for v in variants.split(",") if v.strip()]
    try:
        split = Split(*(_load(f, False).records for f in (train_file, val_file, test_file)))
        _require_gold(test_file, split.test, "the experiment scores every variant against gold")
        run_experiment(
            split,
            out,
            names,
            list(range(seeds)),
            config,
            overrides or [],
            progress,
            log=lambda m: console.print(m, highlight=False),
        )
    except _expected_errors() as exc:
        _fail(str(exc))
    out_console.print((out / "tables.md").read_text(), highlight=False)


@app.command()
def report(
    path: Annotated[Path, typer.Argument(help="A run folder or an experiment folder.")],
    out: Annotated[Path | None, typer.Option("--out", help="Where to write the figures and index.html.")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="Products whose attention masks to draw.")] = None,
) -> None:
    """PNG figures (masks, source-aware bars, per-attribute F1, retrieval vs alpha) and one HTML page."""
    _quiet_libraries()
    _need_extra("report", "report", "matplotlib")
    from pv2tea.viz.run_report import build_report

    notes: list[str] = []
    try:
        index = build_report(path, out, data, notes=notes)
    except _expected_errors() as exc:
        _fail(str(exc))
    for note in notes:
        console.print(f"[yellow]{escape(note)}[/]", highlight=False)
    console.print(f"report: {index}")


cache_app = typer.Typer(no_args_is_help=True, help="The frozen backbones' feature cache on disk.")
app.add_typer(cache_app, name="cache")


@cache_app.command("build")
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
    _quiet_libraries()
    from pv2tea.cache.build import ensure_cache, model_for_cache, run_cache_rows
    from pv2tea.cache.store import FeatureCacheError, summary
    from pv2tea.config import load_config

    t0 = time.time()
    try:
        cfg = load_config(config, overrides)
        records = [r for path in data for r in _load(path, skip_invalid).records]
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
    except _expected_errors(FeatureCacheError) as exc:
        _fail(str(exc))
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


@cache_app.command("info")
def cache_info(
    directory: Annotated[Path, typer.Argument(help="A cache folder (pv2tea cache build --out).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
) -> None:
    """Rows, shards, size and backbone identity of a feature cache, and whether it is complete (exit code 1 if not)."""
    from pv2tea.cache.store import FeatureCacheError, summary

    try:
        info = summary(directory)
    except FeatureCacheError as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps(info))
    else:
        _print_cache_summary(info)
    if not info["complete"]:
        raise typer.Exit(1)


bench_app = typer.Typer(
    no_args_is_help=True,
    help="Benchmarks: accuracy on your catalogue or ImplicitAVE; S3, training, extraction and serving speed.",
)
app.add_typer(bench_app, name="bench")


@bench_app.command("implicitave")
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
    text_pretrain: Annotated[
        int,
        typer.Option(
            min=0,
            help="Epochs of a TEA trained once per domain on all its text-only rows, whose text encoder, fusion and decoder start every fold's run (0: none).",
        ),
    ] = 6,
    quick: Annotated[
        bool, typer.Option("--quick", help="1 fold, 1 seed (smoke test; the full protocol's fold 0).")
    ] = False,
    config: Annotated[str | None, typer.Option("--config", "-c")] = "cpu",
    overrides: Annotated[list[str] | None, typer.Option("--set")] = None,
) -> None:
    """Weak labels from a TF-IDF text extractor -> k-fold PV2TEA vs TEA vs the extractor, per domain.

    The last line printed is a JSON object {"domains": {DOMAIN: {VARIANT: {"f1", "accuracy", "f1_open"}}}}
    (f1/accuracy: answers ranked among the closed option lists, ImplicitAVE-style).
    """
    _quiet_libraries()
    from pv2tea.bench.implicitave import BenchConfig, headline, run_bench

    try:
        cfg = BenchConfig(
            root=root,
            out=out,
            domains=[d.strip() for d in domains.split(",")] if domains else None,
            folds=folds,
            seeds=[int(s) for s in seeds.split(",") if s.strip()],
            variants=[v.strip() for v in variants.split(",") if v.strip()],
            gold_ceiling=gold_ceiling,
            text_rows=text_rows,
            text_pool=text_pool,
            epochs=epochs,
            text_pretrain=text_pretrain,
            quick=quick,
            config=config or "cpu",
            overrides=overrides or [],
        )
        results = run_bench(cfg, log=lambda m: console.print(m, highlight=False))
    except _expected_errors() as exc:
        _fail(str(exc))
    out_console.print((out / "tables.md").read_text(), highlight=False)
    print(json.dumps(headline(results)))


@bench_app.command("catalog")
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
    text_pretrain: Annotated[
        int, typer.Option(min=0, help="Epochs of the warm start on the text-labelled rows (0: none).")
    ] = 6,
    quick: Annotated[bool, typer.Option("--quick", help="1 fold, 1 seed (the full protocol's fold 0).")] = False,
    config: Annotated[str | None, typer.Option("--config", "-c")] = "cpu",
    overrides: Annotated[list[str] | None, typer.Option("--set")] = None,
) -> None:
    """The weak-label protocol on your own gold-labelled catalogue: extractor vs TEA vs PV2TEA, by source.

    The last line printed is a JSON object {"catalog": {"overall": {VARIANT: {"f1", "f1_text", "f1_image", "gap"}},
    "attributes": {...}, "p": {VARIANT: {"vs_extractor", "vs_tea"}}, "seconds", "peak_rss_gb"}} (F1 in points, ranked
    among the text-labelled share's values; overall: the mean over attributes).
    """
    _quiet_libraries()
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
            seeds=[int(s) for s in seeds.split(",") if s.strip()],
            variants=[v.strip() for v in variants.split(",") if v.strip()],
            gold_ceiling=gold_ceiling,
            text_rows=text_rows,
            epochs=epochs,
            text_pretrain=text_pretrain,
            quick=quick,
            config=config or "cpu",
            overrides=overrides or [],
            fold_score="attribute_mean",
        )
        results = run_catalog_bench(cfg, log=lambda m: console.print(m, highlight=False))
    except _expected_errors() as exc:
        _fail(str(exc))
    out_console.print((out / "tables.md").read_text(), highlight=False)
    print(json.dumps(catalog_headline(results)))


@bench_app.command("neighbors")
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
            sizes=tuple(int(n) for n in sizes.split(",") if n.strip()), k=k, dim=dim, repeats=1 if quick else 2
        )
        result = run_neighbor_bench(cfg, log=lambda m: console.print(m, highlight=False))
    except (RuntimeError, ValueError) as exc:
        _fail(str(exc))
    out_console.print(format_table(result), highlight=False)
    print(json.dumps(result))


@bench_app.command("train")
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
    _quiet_libraries()
    from pv2tea.bench.train import TrainBenchConfig, format_table, run_train_bench

    try:
        settings: dict[str, Any] = {
            "config": config or "cpu",
            "overrides": tuple(overrides or ()),
            "memory_sizes": tuple(int(n) for n in memory_sizes.split(",") if n.strip()),
            "processes": tuple(int(n) for n in processes.split(",") if n.strip()),
            "threads": threads,
        }
        cfg = TrainBenchConfig.quick(**settings) if quick else TrainBenchConfig(**settings)
        result = run_train_bench(cfg, log=lambda m: console.print(m, highlight=False))
    except _expected_errors(RuntimeError) as exc:
        _fail(str(exc))
    out_console.print(format_table(result))
    print(json.dumps(result))


@bench_app.command("extract")
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
    _quiet_libraries()
    from pv2tea.bench.extract import ExtractBenchConfig, format_table, run_extract_bench

    try:
        settings: dict[str, Any] = {
            "model": model,
            "candidates": candidates,
            "batch_size": batch_size,
            "threads": threads,
        }
        cfg = ExtractBenchConfig.quick(**settings) if quick else ExtractBenchConfig(**settings)
        result = run_extract_bench(cfg, log=lambda m: console.print(m, highlight=False))
    except _expected_errors(RuntimeError) as exc:
        _fail(str(exc))
    out_console.print(format_table(result))
    print(json.dumps(result))


@bench_app.command("serve")
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
    _quiet_libraries()
    _need_extra("bench serve", "serve", "httpx", "fastapi", "uvicorn", "prometheus_client")
    from pv2tea.serve.bench import ServeBenchConfig, format_table, run_serve_bench

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
        result = run_serve_bench(cfg, log=lambda m: console.print(m, highlight=False))
    except _expected_errors(RuntimeError) as exc:
        _fail(str(exc))
    out_console.print(format_table(result), highlight=False)
    print(json.dumps({"serve": result["serve"]}))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI in-process (for tests): returns the exit code instead of exiting."""
    try:
        code = app(args=argv, standalone_mode=False)
        return code if isinstance(code, int) else 0
    except typer.Exit as exc:
        return exc.exit_code
    except SystemExit as exc:  # click usage errors
        return int(exc.code or 0)
    except Exception as exc:  # click.ClickException (bad options)
        from click import ClickException

        if isinstance(exc, ClickException):
            exc.show()
            return exc.exit_code
        raise


if __name__ == "__main__":
    sys.exit(main())
