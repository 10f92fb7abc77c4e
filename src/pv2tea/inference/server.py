"""An HTTP endpoint for a trained model (FastAPI): ``POST /predict``, ``GET /health``, ``/ready`` and ``/metrics``.

A request carries products in the dataset schema; their images come inline (base64 in ``images``) or, when
the server was started with an image root, as file names under it (``image_paths``). Each request is checked
with the same row validation as a dataset file, so a bad product is answered with HTTP 422 naming its row
(1-based position in ``products``), field and problem, and nothing is predicted for that request. The answers
are the rows ``pv2tea predict`` writes (:func:`pv2tea.inference.predictor.prediction_rows`).

Under load, images are decoded in memory by a pool of worker threads (their size and pixel count checked
from the header first, :mod:`pv2tea.serve.limits`) and the rows of concurrent requests are coalesced into
model batches on one model thread (:mod:`pv2tea.serve.batcher`). A full queue is answered 503 with
``Retry-After``, a request slower than the timeout 504; ``/metrics`` exposes Prometheus counters.

Start it with ``pv2tea serve --model RUN/final``; the interactive API description is at ``/docs``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import itertools
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from pv2tea.extras import missing_extra

try:
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from pydantic import BaseModel, ConfigDict, Field
except ImportError as exc:
    raise missing_extra("serve", "serve", exc) from exc

from pv2tea.data.dataset import Preprocessor
from pv2tea.data.schema import Record
from pv2tea.data.validate import validate_rows
from pv2tea.decoding import fusion
from pv2tea.decoding.calibration import Calibration
from pv2tea.inference.predictor import Predictor, prediction_rows
from pv2tea.serve.batcher import Job, MicroBatcher, QueueFull
from pv2tea.serve.limits import ImageRejected, Limits, decode_base64, default_workers, open_image, read_image_file
from pv2tea.serve.metrics import ServiceMetrics

if TYPE_CHECKING:  # only for annotations: the extractor's libraries load when --extractor is used
    from pv2tea.baselines import TextExtractor

MAX_IMAGE_BYTES = Limits.max_image_bytes  # per inline image, decoded (the default limit)
MEMORY_PREFIX = "memory:"  # Record.images entries naming an image decoded in memory by the server
OPEN_ROUTES = ("/health", "/ready")  # answered without the API key (load-balancer probes)
ROUTES = ("/predict", "/health", "/ready", "/metrics")


class Product(BaseModel):
    """One (product, attribute) row to answer."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Unique within the request, e.g. 'p00012-color'.")
    text: str = Field(description="Title, bullets and description.")
    category: str
    attribute: str = Field(description="The attribute to extract, e.g. 'color'.")
    images: list[str] = Field(default=[], description="Image files, base64-encoded (a data: URI prefix is allowed).")
    image_paths: list[str] = Field(default=[], description="Image files under the server's --image-root.")
    label: list[str] = Field(default=[], description="Existing values, e.g. a text extractor's (keep_grounded).")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    products: list[Product] = Field(min_length=1)
    keep_grounded: bool = Field(False, description="Return a row's label where its text states it.")
    num_beams: int | None = Field(None, ge=1, le=16)


class Prediction(BaseModel):
    id: str
    attribute: str
    category: str
    values: list[str]
    kept_label: bool | None = None


class PredictResponse(BaseModel):
    predictions: list[Prediction]
    seconds: float


class MemoryImagePreprocessor(Preprocessor):
    """A :class:`Preprocessor` that reads images the server decoded (``memory:`` keys) from ``tensors``."""

    tensors: Mapping[str, torch.Tensor] = {}

    @classmethod
    def wrap(cls, pre: Preprocessor) -> MemoryImagePreprocessor:
        return cls(**{f.name: getattr(pre, f.name) for f in dataclasses.fields(pre)})

    def image_tensor(self, record: Record, position: int = 0) -> torch.Tensor | None:
        if not self.cfg.vision.enabled or len(record.images) <= position:
            return None
        name = record.images[position]
        return self.tensors[name] if name.startswith(MEMORY_PREFIX) else super().image_tensor(record, position)


def _problem(row: int, field: str, message: str) -> dict[str, Any]:
    return {"row": row, "field": field, "message": message}


class _Guard:
    """ASGI middleware: API key, request body limit, and per-route request counts and latency."""

    def __init__(self, app, *, metrics: ServiceMetrics, api_key: str | None, max_body_bytes: int):
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = 500
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}

        async def send_counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.api_key is not None and scope["path"] not in OPEN_ROUTES and not self._authorized(headers):
                return await _json(
                    send_counted,
                    401,
                    {
                        "detail": "missing or wrong API key: send the header "
                        "'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
                    },
                    [(b"www-authenticate", b"Bearer")],
                )
            length = headers.get("content-length", b"")
            if length.isdigit() and int(length) > self.max_body_bytes:
                return await _json(send_counted, 413, {"detail": self._too_large()})
            received = 0

            async def receive_limited():
                nonlocal received
                message = await receive()
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise HTTPException(413, self._too_large())
                return message

            await self.app(scope, receive_limited, send_counted)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)

    def _authorized(self, headers: Mapping[str, bytes]) -> bool:
        if self.api_key is None:
            return True
        given = headers.get("x-api-key")
        if given is None:
            scheme, _, token = headers.get("authorization", b"").partition(b" ")
            given = token.strip() if scheme.lower() == b"bearer" else b""
        return hmac.compare_digest(given, self.api_key)

    def _too_large(self) -> str:
        return f"the request body is larger than {self.max_body_bytes:,} bytes (--max-body-bytes)"


async def _json(send, status: int, body: dict, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    response = JSONResponse(body, status_code=status, headers={k.decode(): v.decode() for k, v in headers})
    await response({"type": "http"}, _no_request_body, send)


async def _no_request_body() -> dict[str, Any]:
    """The ``receive`` of a response sent before (or instead of) reading the request: nothing more comes."""
    return {"type": "http.disconnect"}


def create_app(
    predictor: Predictor,
    *,
    model_name: str = "",
    candidates: Mapping | None = None,
    image_root: str | Path | None = None,
    batch_size: int = 32,
    max_products: int | None = None,
    extractor: TextExtractor | None = None,
    extractor_weight: float = 1.0,
    calibration: Calibration | None = None,
    limits: Limits | None = None,
    max_wait_ms: float = 5.0,
    max_queue: int = 256,
    request_timeout: float = 30.0,
    batching: bool = True,
    api_key: str | None = None,
    workers: int | None = None,
) -> FastAPI:
    """The FastAPI application serving ``predictor``.

    Concurrent requests are coalesced into model batches of at most ``batch_size`` rows, waiting at most
    ``max_wait_ms`` for more (``batching=False``: one request per batch). At most ``max_queue`` requests wait
    (then 503); a request taking longer than ``request_timeout`` seconds gets 504. ``limits`` bound what a
    request may carry (``max_products`` overrides its product limit). With ``api_key`` every route except
    ``/health`` and ``/ready`` needs it. With ``extractor`` (and ``candidates``) candidate ranking is fused
    with the extractor's probabilities, per attribute as ``calibration`` says when given (``pv2tea calibrate``).
    """
    fusion.check_fusion(candidates, extractor)
    if calibration is not None and extractor is None:
        raise ValueError("a calibration weighs the model against a text extractor: it needs --extractor")
    if request_timeout <= 0:
        raise ValueError(f"the request timeout must be > 0 seconds, got {request_timeout}")
    limits = limits or Limits()
    if max_products is not None:
        limits = dataclasses.replace(limits, max_products=max_products)
    root = Path(image_root).resolve() if image_root is not None else None
    metrics = ServiceMetrics.create()
    pre = MemoryImagePreprocessor.wrap(predictor.pre)
    serving = Predictor(predictor.model, pre, precision=predictor.precision)
    vision = pre.cfg.vision.enabled
    pool = ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix="pv2tea-images")
    job_ids = itertools.count()

    def predict_rows(records: Sequence[Record], num_beams: int | None, tensors: dict) -> list[list[str]]:
        pre.tensors = tensors
        try:
            priors = extractor.value_probabilities(records) if extractor is not None else None
            return serving.predict(
                records,
                batch_size,
                num_beams,
                candidates=candidates,
                priors=priors,
                prior_weight=extractor_weight,
                calibration=calibration,
            )
        finally:
            pre.tensors = {}

    def warmup() -> None:
        key = f"{MEMORY_PREFIX}warmup"
        record = Record(
            id="warmup",
            text="warm up",
            images=(key,) if vision else (),
            category=pre.categories[0] if pre.categories else "product",
            attribute=pre.attributes[0] if pre.attributes else "color",
            label=(),
        )
        tensors = {key: pre.transform(Image.new("RGB", (64, 64), (128, 128, 128)))} if vision else {}
        predict_rows([record], None, tensors)

    batcher = MicroBatcher(
        predict_rows,
        max_batch=batch_size,
        max_wait=max_wait_ms / 1000,
        max_queue=max_queue,
        coalesce=batching,
        on_batch=metrics.observe_batch,
        warmup=warmup,
    )

    def image_tensor(raw: bytes) -> torch.Tensor | None:
        image = open_image(raw, limits)
        return pre.transform(image) if vision else None

    def prepare(request: PredictRequest, job: int) -> tuple[list[Record], dict, list[dict]]:
        """Validated records (images decoded in memory), their image tensors, and the problems found."""
        rows, keys, tensors, problems = [], [], {}, []
        for n, product in enumerate(request.products, start=1):
            row = product.model_dump(exclude={"images", "image_paths"}, exclude_defaults=True)  # no label: unlabelled
            rows.append(row)
            names: list[str] = []
            keys.append(names)
            if len(product.text) > limits.max_text_chars:
                problems.append(
                    _problem(
                        n,
                        "text",
                        f"{len(product.text):,} characters; at most {limits.max_text_chars:,} (--max-text-chars)",
                    )
                )
            count = len(product.images) + len(product.image_paths)
            if count > limits.max_images_per_product:
                metrics.images_rejected.labels("count").inc()
                problems.append(
                    _problem(
                        n,
                        "images",
                        f"{count} images; at most {limits.max_images_per_product} per product (--max-images)",
                    )
                )
                continue
            # (field, base64 data or a file name under --image-root, whether it is a file name)
            sources = [(f"images[{k}]", data, False) for k, data in enumerate(product.images)]
            sources += [(f"image_paths[{k}]", name, True) for k, name in enumerate(product.image_paths)]
            for field, value, is_path in sources:
                try:
                    if not is_path:
                        raw = decode_base64(value, limits)
                    elif root is None:
                        problems.append(
                            _problem(
                                n, field, "this server has no --image-root; send the image inline in 'images' (base64)"
                            )
                        )
                        continue
                    else:
                        raw = read_image_file(root, value, limits)
                    tensor = image_tensor(raw)
                except ImageRejected as exc:
                    metrics.images_rejected.labels(exc.reason).inc()
                    problems.append(_problem(n, field, str(exc)))
                    continue
                key = f"{MEMORY_PREFIX}{job}/{n}/{field}"
                names.append(key)
                if tensor is not None:
                    tensors[key] = tensor
        records, invalid = validate_rows(
            [{**r, "images": []} for r in rows], "request", check_images=False, require_label=False
        )
        problems += [_problem(e.row, e.field, e.message) for _, errors in invalid for e in errors]
        if problems:
            return [], {}, problems
        records = [dataclasses.replace(r, images=tuple(k)) for r, k in zip(records, keys)]
        if extractor is not None:
            problems += [
                _problem(
                    n,
                    "attribute",
                    f"'{r.attribute}' is unknown to the text extractor (it knows "
                    f"{', '.join(sorted(extractor.vocabularies))})",
                )
                for n, r in enumerate(records, 1)
                if r.attribute not in extractor.vocabularies
            ]
        return records, tensors, problems

    async def answer(request: PredictRequest, t0: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        records, tensors, problems = await loop.run_in_executor(pool, prepare, request, next(job_ids))
        if problems:
            raise HTTPException(422, sorted(problems, key=lambda p: p["row"]))
        if request.keep_grounded and not any(r.label for r in records):
            raise HTTPException(
                422,
                [_problem(0, "label", "keep_grounded needs the products' existing values in 'label'; none has one")],
            )
        try:
            future = batcher.submit(Job(records, key=request.num_beams, payload=tensors))
        except QueueFull as exc:
            raise HTTPException(
                503, f"the server is busy ({exc}); retry after a second", headers={"Retry-After": "1"}
            ) from None
        finally:
            metrics.queue_depth.set(batcher.depth)
        preds = await asyncio.wrap_future(future)
        return {
            "predictions": prediction_rows(records, preds, request.keep_grounded),
            "seconds": time.perf_counter() - t0,
        }

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await asyncio.get_running_loop().run_in_executor(None, batcher.close, request_timeout)
        pool.shutdown(wait=False)

    app = FastAPI(title="pv2tea", summary="Product attribute values from text and image (PV2TEA).", lifespan=lifespan)
    app.state.batcher, app.state.metrics, app.state.limits = batcher, metrics, limits

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes each offending input back, which for a huge field is a huge answer
        detail = [{k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": model_name,
            "images": predictor.model.visual is not None,
            "candidates": candidates is not None,
            "extractor": extractor is not None,
            "max_products": limits.max_products,
        }

    @app.get("/ready")
    def ready() -> JSONResponse:
        if batcher.warmup_error is not None:
            return JSONResponse(
                {
                    "status": "failed",
                    "detail": f"the warm-up prediction failed: "
                    f"{type(batcher.warmup_error).__name__}: {batcher.warmup_error}",
                },
                status_code=503,
            )
        if not batcher.ready.is_set():
            return JSONResponse({"status": "warming up"}, status_code=503, headers={"Retry-After": "1"})
        return JSONResponse({"status": "ready", "model": model_name})

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        metrics.queue_depth.set(batcher.depth)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/predict", response_model=PredictResponse, response_model_exclude_none=True)
    async def predict(request: PredictRequest) -> dict[str, Any]:
        if len(request.products) > limits.max_products:
            raise HTTPException(
                413, f"{len(request.products)} products in one request; at most {limits.max_products} (--max-products)"
            )
        t0 = time.perf_counter()
        try:
            return await asyncio.wait_for(answer(request, t0), request_timeout)
        except asyncio.TimeoutError:
            raise HTTPException(
                504,
                f"no answer within {request_timeout:g} s (--request-timeout); the server is "
                f"overloaded or the request too large: retry later or send fewer products",
            ) from None

    app.add_middleware(_Guard, metrics=metrics, api_key=api_key, max_body_bytes=limits.max_body_bytes)
    return app
