"""``pv2tea serve``: a model over HTTP. The command gathers its options into a
:class:`pv2tea.serve.options.ServeOptions` and :func:`run_server` serves with them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from pv2tea.cli.common import (
    CalibrationOption,
    CandidatesOption,
    DeviceOption,
    PrecisionOption,
    console,
    expected_errors,
    fail,
    load_calibration,
    load_extractor,
    need_extra,
    quiet_libraries,
    read_candidates,
    warn,
)
from pv2tea.serve.options import ServeOptions

# serve's options, declared once so that its signature reads one line per option
ModelOption = Annotated[Path, typer.Option("--model", "-m", help="Checkpoint folder.")]
HostOption = Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0: every interface).")]
PortOption = Annotated[int, typer.Option(min=1, max=65535)]
ImageRootOption = Annotated[
    Path | None,
    typer.Option(
        "--image-root",
        help="Folder whose files requests may name in 'image_paths' (default: inline images only); paths and symlinks leaving it are refused.",
    ),
]
MaxBatchOption = Annotated[
    int,
    typer.Option(
        "--max-batch",
        "--batch-size",
        min=1,
        help="Most rows in one model batch; concurrent requests are coalesced up to it.",
    ),
]
MaxWaitOption = Annotated[
    float, typer.Option("--max-wait-ms", min=0.0, help="How long a batch waits for more requests before it runs.")
]
BatchingOption = Annotated[
    bool,
    typer.Option("--batching/--no-batching", help="Coalesce concurrent requests (off: one request per model batch)."),
]
MaxQueueOption = Annotated[
    int, typer.Option("--max-queue", min=1, help="Requests that may wait for the model; beyond, 503 with Retry-After.")
]
RequestTimeoutOption = Annotated[
    float, typer.Option("--request-timeout", min=0.001, help="Seconds before a request is answered 504.")
]
MaxProductsOption = Annotated[int, typer.Option(min=1, help="Most products one request may carry (413).")]
MaxBodyBytesOption = Annotated[int, typer.Option("--max-body-bytes", min=1, help="Largest request body (413).")]
MaxTextCharsOption = Annotated[
    int, typer.Option("--max-text-chars", min=1, help="Longest product text, in characters (422).")
]
MaxImagesOption = Annotated[
    int, typer.Option("--max-images", min=1, help="Most images per product, inline and by path (422).")
]
MaxImageBytesOption = Annotated[int, typer.Option("--max-image-bytes", min=1, help="Largest encoded image file (422).")]
MaxImagePixelsOption = Annotated[
    int,
    typer.Option(
        "--max-image-pixels",
        min=1,
        help="Most pixels (width × height) of one image, read from its header before decoding (422).",
    ),
]
ImageFormatsOption = Annotated[
    str, typer.Option("--image-formats", help="Comma-separated image formats allowed (Pillow names) (422).")
]
MaxAspectRatioOption = Annotated[
    float,
    typer.Option(
        "--max-aspect-ratio", min=1.0, help="Longest side / shortest side of one image, read from its header (422)."
    ),
]
MaxFieldCharsOption = Annotated[
    int,
    typer.Option(
        "--max-field-chars",
        min=1,
        help="Longest id, category, attribute, label value or image path, in characters (422).",
    ),
]
MaxLabelsOption = Annotated[int, typer.Option("--max-labels", min=1, help="Most values in one product's label (422).")]
MaxDecodedBytesOption = Annotated[
    int,
    typer.Option(
        "--max-decoded-bytes",
        min=1,
        help="Bytes of decoded images the requests in flight may hold together (a request needing more: 413; "
        "one not fitting beside the others: 503).",
    ),
]
HeaderTimeoutOption = Annotated[
    float,
    typer.Option(
        "--header-timeout",
        min=0.001,
        help="Seconds a connection may take to send a request's headers; then 408 and closed.",
    ),
]
BodyTimeoutOption = Annotated[
    float,
    typer.Option("--body-timeout", min=0.001, help="Seconds a request's body may take to arrive; then 408 and closed."),
]
MaxConnectionsOption = Annotated[
    int, typer.Option("--max-connections", min=1, help="Open connections; a request beyond them is answered 503.")
]
WorkersOption = Annotated[
    int | None, typer.Option("--workers", min=1, help="Image-decoding threads (default: one per core).")
]
ApiKeyFileOption = Annotated[
    Path | None,
    typer.Option(
        "--api-key-file",
        help="File holding an API key that /predict and /metrics require (or set PV2TEA_API_KEY); /health and /ready stay open.",
    ),
]
LogLevelOption = Annotated[str, typer.Option("--log-level", help="uvicorn's log level (warning: no access log).")]
ThreadsOption = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        help="torch threads of the model (default: torch's; 1 on a machine shared with other jobs).",
    ),
]
ExtractorOption = Annotated[
    Path | None,
    typer.Option(
        "--extractor",
        help="A saved text extractor: rank candidates by the model and the extractor together (needs --candidates).",
    ),
]
ExtractorWeightOption = Annotated[
    float, typer.Option(min=0.0, help="Weight of the extractor's log-probability in --extractor fusion.")
]


def serve(
    model: ModelOption,
    host: HostOption = ServeOptions.host,
    port: PortOption = ServeOptions.port,
    image_root: ImageRootOption = ServeOptions.image_root,
    candidates: CandidatesOption = ServeOptions.candidates,
    batch_size: MaxBatchOption = ServeOptions.batch_size,
    max_wait_ms: MaxWaitOption = ServeOptions.max_wait_ms,
    batching: BatchingOption = ServeOptions.batching,
    max_queue: MaxQueueOption = ServeOptions.max_queue,
    request_timeout: RequestTimeoutOption = ServeOptions.request_timeout,
    max_products: MaxProductsOption = ServeOptions.max_products,
    max_body_bytes: MaxBodyBytesOption = ServeOptions.max_body_bytes,
    max_text_chars: MaxTextCharsOption = ServeOptions.max_text_chars,
    max_images: MaxImagesOption = ServeOptions.max_images,
    max_image_bytes: MaxImageBytesOption = ServeOptions.max_image_bytes,
    max_image_pixels: MaxImagePixelsOption = ServeOptions.max_image_pixels,
    image_formats: ImageFormatsOption = ServeOptions.image_formats,
    max_aspect_ratio: MaxAspectRatioOption = ServeOptions.max_aspect_ratio,
    max_field_chars: MaxFieldCharsOption = ServeOptions.max_field_chars,
    max_labels: MaxLabelsOption = ServeOptions.max_labels,
    max_decoded_bytes: MaxDecodedBytesOption = ServeOptions.max_decoded_bytes,
    header_timeout: HeaderTimeoutOption = ServeOptions.header_timeout,
    body_timeout: BodyTimeoutOption = ServeOptions.body_timeout,
    max_connections: MaxConnectionsOption = ServeOptions.max_connections,
    workers: WorkersOption = ServeOptions.workers,
    api_key_file: ApiKeyFileOption = ServeOptions.api_key_file,
    log_level: LogLevelOption = ServeOptions.log_level,
    threads: ThreadsOption = ServeOptions.threads,
    device: DeviceOption = ServeOptions.device,
    precision: PrecisionOption = ServeOptions.precision,
    extractor: ExtractorOption = ServeOptions.extractor,
    extractor_weight: ExtractorWeightOption = ServeOptions.extractor_weight,
    calibration: CalibrationOption = ServeOptions.calibration,
) -> None:
    """Serve a model over HTTP: POST /predict, GET /health, /ready, /metrics (API description at /docs).

    SIGTERM finishes the requests in flight, refuses new connections and exits 0.
    """
    run_server(
        ServeOptions(
            model=model,
            host=host,
            port=port,
            api_key_file=api_key_file,
            log_level=log_level,
            image_root=image_root,
            candidates=candidates,
            batch_size=batch_size,
            max_wait_ms=max_wait_ms,
            batching=batching,
            max_queue=max_queue,
            request_timeout=request_timeout,
            workers=workers,
            max_products=max_products,
            max_body_bytes=max_body_bytes,
            max_text_chars=max_text_chars,
            max_images=max_images,
            max_image_bytes=max_image_bytes,
            max_image_pixels=max_image_pixels,
            image_formats=image_formats,
            max_aspect_ratio=max_aspect_ratio,
            max_field_chars=max_field_chars,
            max_labels=max_labels,
            max_decoded_bytes=max_decoded_bytes,
            header_timeout=header_timeout,
            body_timeout=body_timeout,
            max_connections=max_connections,
            threads=threads,
            device=device,
            precision=precision,
            extractor=extractor,
            extractor_weight=extractor_weight,
            calibration=calibration,
        )
    )


def _api_key(options: ServeOptions) -> str | None:
    """The API key requests must carry: the --api-key-file's, else $PV2TEA_API_KEY's, else none."""
    api_key = os.environ.get("PV2TEA_API_KEY") or None
    if options.api_key_file is not None:
        if not options.api_key_file.is_file():
            fail(f"--api-key-file {options.api_key_file}: no such file")
        api_key = options.api_key_file.read_text().strip()
        if not api_key:
            fail(f"--api-key-file {options.api_key_file} is empty")
    return api_key


def run_server(options: ServeOptions) -> None:
    """Load the model and serve it with uvicorn until stopped; SIGTERM finishes the requests in flight and returns."""
    quiet_libraries()
    need_extra("serve", "serve", "fastapi", "uvicorn", "prometheus_client")
    import signal
    import threading

    import torch
    import uvicorn

    from pv2tea.decoding.fusion import check_fusion
    from pv2tea.inference.device import autocast_for, resolve_device
    from pv2tea.inference.predictor import Predictor
    from pv2tea.models.checkpoint import checkpoint_warnings_to
    from pv2tea.serve.connections import is_loopback, uvicorn_options
    from pv2tea.serve.server import create_app

    if options.threads is not None:
        torch.set_num_threads(options.threads)
    if options.image_root is not None and not options.image_root.is_dir():
        fail(f"--image-root {options.image_root}: not a folder")
    api_key = _api_key(options)
    if api_key is None and not is_loopback(options.host):
        console.print(
            f"[yellow]warning:[/] --host {escape(options.host)} listens beyond this machine and no API key is set: "
            "anyone who can reach the port may call /predict and read /metrics; give --api-key-file FILE (or set "
            "PV2TEA_API_KEY), or keep the default --host 127.0.0.1 behind a proxy that checks callers",
            highlight=False,
        )
    try:
        check_fusion(options.candidates, options.extractor)
        limits = options.limits()
        where = resolve_device(options.device)
        autocast_for(options.precision, where)  # refuse a bad --precision before the model loads
        with checkpoint_warnings_to(warn):
            predictor = Predictor.from_checkpoint(options.model, device=where, precision=options.precision)
        app = create_app(
            predictor,
            model_name=str(options.model),
            candidates=read_candidates(options.candidates),
            image_root=options.image_root,
            batch_size=options.batch_size,
            limits=limits,
            max_wait_ms=options.max_wait_ms,
            max_queue=options.max_queue,
            request_timeout=options.request_timeout,
            batching=options.batching,
            api_key=api_key,
            workers=options.workers,
            extractor=load_extractor(options.extractor),
            extractor_weight=options.extractor_weight,
            calibration=load_calibration(options.calibration, options.model, options.extractor),
        )
    except expected_errors() as exc:
        fail(str(exc))
    console.print(
        f"serving {options.model} on http://{options.host}:{options.port} (POST /predict, GET /health /ready "
        f"/metrics, docs at /docs){'; API key required' if api_key else ''}",
        highlight=False,
    )
    # uvicorn answers SIGTERM by finishing the requests in flight and closing the socket, then raises the signal
    # again to exit; a handler of ours takes that second one, so a graceful stop exits 0
    stopped: list[int] = []
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: stopped.append(sig)) if main_thread else None
    try:
        uvicorn.run(
            app,
            host=options.host,
            port=options.port,
            log_level=options.log_level,
            timeout_graceful_shutdown=int(options.request_timeout) + 5,
            **uvicorn_options(limits),
        )
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    if stopped:
        console.print("SIGTERM: the requests in flight were answered; stopped", highlight=False)
