"""An HTTP endpoint for a trained model (FastAPI): ``POST /predict``, ``GET /health``, ``/ready`` and ``/metrics``.

A request carries products in the dataset schema; their images come inline (base64 in ``images``) or, when
the server was started with an image root, as file names under it (``image_paths``). Each request is checked
with the same row validation as a dataset file, so a bad product is answered with HTTP 422 naming its row
(1-based position in ``products``), field and problem, and nothing is predicted for that request. The answers
are the rows ``pv2tea predict`` writes (:func:`pv2tea.inference.predictor.prediction_rows`).

Every string and list of a request is checked against its limit before any image is decoded. Images are then
decoded in memory by a pool of worker threads (their size, pixel count and aspect ratio checked from the header
first, :mod:`pv2tea.serve.limits`), each request keeping at most as many images in the pool as it has threads, so
that the images of one request never hold those of another back for long; the decoded images of all requests in
flight are bounded in bytes. The rows of concurrent requests are coalesced into model batches on one model thread
(:mod:`pv2tea.serve.batcher`). A full queue is answered 503 with ``Retry-After``, a request slower than the timeout
504, and its images not yet decoded and its rows not yet predicted are dropped. An unexpected error is answered 500
with a request id only, its details going to the log; ``/metrics`` exposes Prometheus counters.

Start it with ``pv2tea serve --model RUN/final``; the interactive API description is at ``/docs``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import itertools
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
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
    from fastapi.routing import APIRoute
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from pydantic import BaseModel, ConfigDict, Field, model_validator
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as exc:
    raise missing_extra("serve", "serve", exc) from exc

from pv2tea.data.dataset import Preprocessor
from pv2tea.data.schema import Record
from pv2tea.data.validate import validate_rows
from pv2tea.decoding import fusion
from pv2tea.decoding.calibration import Calibration
from pv2tea.inference.predictor import Predictor, prediction_rows
from pv2tea.renamed import warn_renamed
from pv2tea.serve.batcher import Job, MicroBatcher, QueueFull
from pv2tea.serve.limits import (
    DecodeBudget,
    ImageRejected,
    Limits,
    decode_base64,
    default_workers,
    lower_decode_priority,
    open_image,
    read_image_file,
)
from pv2tea.serve.metrics import ServiceMetrics

if TYPE_CHECKING:  # only for annotations: the extractor's libraries load when --extractor is used
    from pv2tea.baselines import TextExtractor

MAX_IMAGE_BYTES = Limits.max_image_bytes  # per inline image, decoded (the default limit)
MEMORY_PREFIX = "memory:"  # Record.images entries naming an image decoded in memory by the server
OPEN_ROUTES = ("/health", "/ready")  # answered without the API key (load-balancer probes)
ROUTES = ("/predict", "/health", "/ready", "/metrics")
RENAMED_FIELDS = {"keep_grounded": "keep_labels"}  # old name -> new name of a request field; the old still read
log = logging.getLogger("pv2tea.serve")


class Product(BaseModel):
    """One (product, attribute) row to answer."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Unique within the request, e.g. 'p00012-color'.")
    text: str = Field(description="Title, bullets and description.")
    category: str
    attribute: str = Field(description="The attribute to extract, e.g. 'color'.")
    images: list[str] = Field(default=[], description="Image files, base64-encoded (a data: URI prefix is allowed).")
    image_paths: list[str] = Field(default=[], description="Image files under the server's --image-root.")
    label: list[str] = Field(default=[], description="Existing values, e.g. a text extractor's (keep_labels).")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    products: list[Product] = Field(min_length=1)
    keep_labels: bool = Field(False, description="Kept labels: return a row's label where its text states it.")
    num_beams: int | None = Field(None, ge=1, le=16)

    @model_validator(mode="before")
    @classmethod
    def _old_field_names(cls, data: Any) -> Any:
        """A body's old field names under their new ones (``keep_grounded`` is ``keep_labels``), said once in the
        server log; a body giving both, to different values, is refused."""
        if not isinstance(data, dict):
            return data  # pydantic says what is wrong with it
        for old, new in RENAMED_FIELDS.items():
            if old not in data:
                continue
            warn_renamed(f"the request field {old}", new, logger=log)
            data = dict(data)
            value = data.pop(old)
            if new in data and data[new] != value:
                raise ValueError(
                    f"both {old} (the old name) and {new} are given, with different values; send {new} only"
                )
            data[new] = value
        return data


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


class ASCIIJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: a message quoting a request's broken string (a lone surrogate)
    still encodes, where UTF-8 output would fail and turn a 4xx into a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _json_problem(exc: BaseException) -> str:
    """What is wrong with a body that ``json.loads`` refused, in plain words."""
    if isinstance(exc, UnicodeDecodeError):
        return f"it is not UTF-8 text ({exc.reason} at byte {exc.start})"
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno}, column {exc.colno}"
    if isinstance(exc, RecursionError):
        return "its arrays and objects are nested too deeply"
    return "a number in it has too many digits"  # int("9" * 5000): the integer string conversion limit


class JSONBodyRoute(APIRoute):
    """A route whose body must be JSON: another (or no) ``Content-Type`` is answered 415, and a body that is not JSON
    (not UTF-8, a syntax error, nesting or a number beyond the parser's limits) 422 saying why; FastAPI answers some
    of these 400 "There was an error parsing the body" and others a misleading type error."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def parse_json_first(request: Request) -> Response:
            if not _is_json(request.headers.get("content-type")):
                given = request.headers.get("content-type")
                return ASCIIJSONResponse(
                    {
                        "detail": f"the body must be JSON sent with 'Content-Type: application/json' "
                        f"({f'got {given!r}' if given else 'no Content-Type was sent'})"
                    },
                    status_code=415,
                )
            try:
                await request.json()  # kept by the request: FastAPI does not parse it again
            except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                detail = [
                    {"type": "json_invalid", "loc": ["body"], "msg": f"the body is not JSON: {_json_problem(exc)}"}
                ]
                return ASCIIJSONResponse({"detail": detail}, status_code=422)
            return await handler(request)

        return parse_json_first


class _Guard:
    """ASGI middleware: API key, request body limit and read timeout, per-route request counts and latency, and a
    generic 500 (a request id; the details logged) for any error the application did not answer."""

    def __init__(
        self, app, *, metrics: ServiceMetrics, api_key: str | None, max_body_bytes: int, body_timeout: float = 60.0
    ):
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes
        self.body_timeout = body_timeout
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status, started = 500, False
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}

        async def send_counted(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
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
            received, deadline = 0, time.monotonic() + self.body_timeout

            async def receive_limited():
                nonlocal received
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    raise HTTPException(
                        408,
                        f"the request body did not arrive within {self.body_timeout:g} s (--body-timeout)",
                        headers={"Connection": "close"},
                    ) from None
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise HTTPException(413, self._too_large())
                return message

            try:
                await self.app(scope, receive_limited, send_counted)
            except Exception:
                request_id = uuid.uuid4().hex
                log.exception("request %s (%s %s) failed", request_id, scope.get("method"), scope["path"])
                if started:
                    raise  # the answer is on its way: the server closes the connection
                await _json(
                    send_counted,
                    500,
                    {
                        "detail": f"internal error; the server log has the details under request id {request_id}",
                        "request_id": request_id,
                    },
                    [(b"x-request-id", request_id.encode())],
                )
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
    response = ASCIIJSONResponse(body, status_code=status, headers={k.decode(): v.decode() for k, v in headers})
    await response({"type": "http"}, _no_request_body, send)


async def _no_request_body() -> dict[str, Any]:
    """The ``receive`` of a response sent before (or instead of) reading the request: nothing more comes."""
    return {"type": "http.disconnect"}


@dataclasses.dataclass(eq=False)
class _Image:
    """One distinct image of a request: its memory key, where it comes from, and where the request names it."""

    key: str  # MEMORY_PREFIX + job/number
    value: str  # base64 data, or a file name under the image root
    is_path: bool
    used: bool = False  # among the first vision.max_images of some product: the model reads it
    where: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # (row, field) of each mention


class Service:
    """The state the routes share and the route handlers: the predictor, its micro-batcher, the request limits,
    the metrics, the image-decoding pool and the decoded-image budget.

    The routes :func:`create_app` wires: ``health`` (``GET /health``, the model and what the server was started
    with), ``ready`` (``GET /ready``, 200 once the warm-up prediction has run, 503 before or when it failed),
    ``prometheus_metrics`` (``GET /metrics``) and ``predict`` (``POST /predict``, 413 over the product limit, 504
    past the request timeout, the rest as :meth:`answer` says).

    Args:
        predictor: The trained model to serve.
        model_name: Named by ``/health`` and ``/ready``.
        candidates: Candidate values to rank (per attribute), or None to generate.
        image_root: The folder that ``image_paths`` are read under (None: inline images only).
        batch_size: The most rows of one model batch.
        extractor: A text extractor whose probabilities are fused with candidate ranking.
        extractor_weight: The weight of the extractor's probabilities.
        calibration: Per-attribute fusion weights (``pv2tea calibrate``).
        limits: What a request may carry.
        max_wait_ms: How long a batch waits for more rows.
        max_queue: The most requests waiting (then 503).
        request_timeout: Seconds until a request is answered 504.
        batching: Coalesce concurrent requests into one batch.
        workers: Image-decoding threads (None: :func:`pv2tea.serve.limits.default_workers`).
    """

    def __init__(
        self,
        predictor: Predictor,
        *,
        model_name: str,
        candidates: Mapping | None,
        image_root: str | Path | None,
        batch_size: int,
        extractor: TextExtractor | None,
        extractor_weight: float,
        calibration: Calibration | None,
        limits: Limits,
        max_wait_ms: float,
        max_queue: int,
        request_timeout: float,
        batching: bool,
        workers: int | None,
    ) -> None:
        self.predictor, self.model_name, self.limits = predictor, model_name, limits
        self.candidates, self.extractor, self.extractor_weight = candidates, extractor, extractor_weight
        self.calibration, self.batch_size, self.request_timeout = calibration, batch_size, request_timeout
        self.root = Path(image_root).resolve() if image_root is not None else None
        self.metrics = ServiceMetrics.create()
        self.pre = MemoryImagePreprocessor.wrap(predictor.pre)
        self.serving = Predictor(predictor.model, self.pre, precision=predictor.precision)
        self.vision = self.pre.cfg.vision.enabled
        self.pool = ThreadPoolExecutor(
            max_workers=workers or default_workers(),
            thread_name_prefix="pv2tea-images",
            initializer=lower_decode_priority,
        )
        self.job_ids = itertools.count()
        self.batcher = MicroBatcher(
            self.predict_rows,
            max_batch=batch_size,
            max_wait=max_wait_ms / 1000,
            max_queue=max_queue,
            coalesce=batching,
            on_batch=self.metrics.observe_batch,
            warmup=self.warmup,
        )
        # the bytes of one decoded image as the model reads it: a float32 (3, H, W) tensor
        self.image_bytes = 3 * self.pre.image_size[0] * self.pre.image_size[1] * 4 if self.vision else 0
        self.used_images = self.pre.cfg.vision.max_images if self.vision else 0  # a product's first ones are read
        self.window = workers or default_workers()  # images of one request in the pool at a time
        self.budget = DecodeBudget(limits.max_decoded_bytes)

    # ------------------------------------------------------------------------------------------------ routes

    # the route handlers have no docstring: FastAPI would publish it as the route's description in /openapi.json

    def health(self) -> dict[str, Any]:  # GET /health: the model and what the server was started with
        return {
            "status": "ok",
            "model": self.model_name,
            "images": self.predictor.model.visual is not None,
            "candidates": self.candidates is not None,
            "extractor": self.extractor is not None,
            "max_products": self.limits.max_products,
        }

    def ready(self) -> JSONResponse:  # GET /ready: 200 once the warm-up prediction has run, else 503
        batcher = self.batcher
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
        return JSONResponse({"status": "ready", "model": self.model_name})

    def prometheus_metrics(self) -> Response:  # GET /metrics: the Prometheus counters
        self.metrics.queue_depth.set(self.batcher.depth)
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def predict(self, request: PredictRequest) -> dict[str, Any]:  # POST /predict (413 past max_products)
        limits = self.limits
        if len(request.products) > limits.max_products:
            raise HTTPException(
                413, f"{len(request.products)} products in one request; at most {limits.max_products} (--max-products)"
            )
        t0 = time.perf_counter()
        try:
            return await asyncio.wait_for(self.answer(request, t0), self.request_timeout)
        except asyncio.TimeoutError:
            raise HTTPException(
                504,
                f"no answer within {self.request_timeout:g} s (--request-timeout); the server is "
                f"overloaded or the request too large: retry later or send fewer products",
            ) from None

    @asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        """The application's lifespan: on shutdown the batcher finishes its batches, the pool stops."""
        yield
        await asyncio.get_running_loop().run_in_executor(None, self.batcher.close, self.request_timeout)
        self.pool.shutdown(wait=False)

    # ------------------------------------------------------------------------------------------------ the model

    def predict_rows(self, records: Sequence[Record], num_beams: int | None, tensors: dict) -> list[list[str]]:
        """The values of one model batch, its images read from ``tensors`` (memory key -> (3, H, W) tensor)."""
        pre, extractor = self.pre, self.extractor
        pre.tensors = tensors
        try:
            priors = extractor.value_probabilities(records) if extractor is not None else None
            return self.serving.predict(
                records,
                self.batch_size,
                num_beams,
                candidates=self.candidates,
                priors=priors,
                prior_weight=self.extractor_weight,
                calibration=self.calibration,
            )
        finally:
            pre.tensors = {}

    def warmup(self) -> None:
        """One prediction on a grey image before the server reports ready."""
        pre, vision = self.pre, self.vision
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
        self.predict_rows([record], None, tensors)

    # ------------------------------------------------------------------------------------------------ a request

    def check(self, request: PredictRequest, job: int) -> tuple[list[Record], list[_Image], list[dict]]:
        """The request's records (their images named by memory keys), its distinct images to decode, and the
        problems found without decoding any: every string and list against its limit, the row validation of a
        dataset file (empty, not valid Unicode, repeated ids, ...), where each image comes from."""
        limits, metrics, root, extractor = self.limits, self.metrics, self.root, self.extractor
        rows: list[dict[str, Any]] = []
        keys: list[list[str]] = []  # per product: the memory keys of its images, in order
        problems: list[dict[str, Any]] = []
        images: dict[tuple[bool, str], _Image] = {}  # a repeated image is decoded once
        checked: list[int] = []  # the rows whose strings are within their limits: they are validated
        for n, product in enumerate(request.products, start=1):
            found = len(problems)
            lengths = [("text", product.text, limits.max_text_chars, "--max-text-chars")]
            lengths += [
                (name, getattr(product, name), limits.max_field_chars, "--max-field-chars")
                for name in ("id", "category", "attribute")
            ]
            if len(product.label) > limits.max_labels:  # (its values are not looked at one by one)
                problems.append(
                    _problem(n, "label", f"{len(product.label):,} values; at most {limits.max_labels:,} (--max-labels)")
                )
            else:
                lengths += [
                    (f"label[{k}]", v, limits.max_field_chars, "--max-field-chars") for k, v in enumerate(product.label)
                ]
            lengths += [
                (f"image_paths[{k}]", v, limits.max_field_chars, "--max-field-chars")
                for k, v in enumerate(product.image_paths[: limits.max_images_per_product])
            ]
            for field, value, most, option in lengths:
                if len(value) > most:
                    problems.append(_problem(n, field, f"{len(value):,} characters; at most {most:,} ({option})"))
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
            if len(problems) > found:
                keys.append([])
                continue
            checked.append(n)
            rows.append(product.model_dump(exclude={"images", "image_paths"}, exclude_defaults=True))
            names: list[str] = []
            keys.append(names)
            # (field, base64 data or a file name under --image-root, whether it is a file name)
            sources = [(f"images[{k}]", data, False) for k, data in enumerate(product.images)]
            sources += [(f"image_paths[{k}]", name, True) for k, name in enumerate(product.image_paths)]
            for position, (field, value, is_path) in enumerate(sources):
                if is_path and root is None:
                    problems.append(
                        _problem(
                            n, field, "this server has no --image-root; send the image inline in 'images' (base64)"
                        )
                    )
                    continue
                image = images.setdefault(
                    (is_path, value), _Image(f"{MEMORY_PREFIX}{job}/{len(images)}", value, is_path)
                )
                image.where.append((n, field))
                image.used = image.used or position < self.used_images
                names.append(image.key)
        records, invalid = validate_rows(rows, "request", check_images=False, require_label=False)
        problems += [_problem(checked[e.row - 1], e.field, e.message) for _, errors in invalid for e in errors]
        if problems:
            return [], [], problems
        records = [dataclasses.replace(r, images=tuple(keys[n - 1])) for r, n in zip(records, checked)]
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
        return records, list(images.values()), problems

    def decode(self, image: _Image, abandoned: threading.Event) -> torch.Tensor | ImageRejected | None:
        """One image as the model reads it (None: one it does not read, only checked), or why it is refused."""
        if abandoned.is_set():  # the request timed out while this waited for a thread
            return None
        try:
            if image.is_path and self.root is not None:
                raw = read_image_file(self.root, image.value, self.limits)
            else:
                raw = decode_base64(image.value, self.limits)
            decoded = open_image(raw, self.limits)
            return self.pre.transform(decoded) if image.used else None  # (3, H, W)
        except ImageRejected as exc:
            return exc

    async def decode_all(self, images: list[_Image]) -> tuple[dict[str, torch.Tensor], list[dict]]:
        """The request's images decoded by the pool, at most ``window`` at a time (the pool is first in, first out: the
        images of a later request wait for as many images as requests are decoding, not for all of an earlier
        request's); cancelled, the images not started are dropped."""
        loop = asyncio.get_running_loop()
        abandoned = threading.Event()
        tensors: dict[str, torch.Tensor] = {}
        problems: list[dict] = []
        pending: dict[asyncio.Future, _Image] = {}
        queue = iter(images)
        try:
            while True:
                while len(pending) < self.window and (image := next(queue, None)) is not None:
                    pending[loop.run_in_executor(self.pool, self.decode, image, abandoned)] = image
                if not pending:
                    return tensors, problems
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    image, result = pending.pop(future), future.result()
                    if isinstance(result, ImageRejected):
                        self.metrics.images_rejected.labels(result.reason).inc()
                        problems += [_problem(n, field, str(result)) for n, field in image.where]
                    elif result is not None:
                        tensors[image.key] = result
        finally:
            abandoned.set()
            for future in pending:
                future.cancel()

    async def answer(self, request: PredictRequest, t0: float) -> dict[str, Any]:
        """The answer to a request within the product limit: checked, its images decoded within the budget, its
        rows predicted by the batcher; an ``HTTPException`` (413, 422, 503) otherwise."""
        metrics, budget, batcher = self.metrics, self.budget, self.batcher
        loop = asyncio.get_running_loop()
        records, images, problems = await loop.run_in_executor(None, self.check, request, next(self.job_ids))
        if problems:
            raise HTTPException(422, sorted(problems, key=lambda p: p["row"]))
        if request.keep_labels and not any(r.label for r in records):
            raise HTTPException(
                422,
                [_problem(0, "label", "keep_labels needs the products' existing values in 'label'; none has one")],
            )
        need = self.image_bytes * sum(image.used for image in images)
        if need > budget.total:
            raise HTTPException(
                413,
                f"the images of this request decode to {need / 2**20:,.1f} MiB for the model; at most "
                f"{budget.total / 2**20:,.1f} MiB (--max-decoded-bytes): send fewer products or images",
            )
        if not budget.take(need):
            raise HTTPException(
                503,
                "the server is busy (the images of the requests in flight fill --max-decoded-bytes); retry after a second",
                headers={"Retry-After": "1"},
            )
        job = None
        try:
            metrics.decoded_bytes.set(budget.in_use)
            tensors, problems = await self.decode_all(images)
            if problems:
                raise HTTPException(422, sorted(problems, key=lambda p: p["row"]))
            try:
                job = Job(records, key=request.num_beams, payload=tensors)
                del tensors
                future = batcher.submit(job)
            except QueueFull as exc:
                raise HTTPException(
                    503, f"the server is busy ({exc}); retry after a second", headers={"Retry-After": "1"}
                ) from None
            finally:
                metrics.queue_depth.set(batcher.depth)
            try:
                preds = await asyncio.wrap_future(future)
            finally:
                if future.cancel():  # abandoned (504) before the model took it: drop its images now
                    job.payload = {}
            return {
                "predictions": prediction_rows(records, preds, request.keep_labels),
                "seconds": time.perf_counter() - t0,
            }
        finally:
            budget.give(need)
            metrics.decoded_bytes.set(budget.in_use)


async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each problem's type, place and message (FastAPI's default echoes each offending input back,
    which for a huge field is a huge answer)."""
    detail = [{k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in exc.errors()]
    return ASCIIJSONResponse({"detail": detail}, status_code=422)


async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    """An ``HTTPException`` as ASCII JSON, with its headers."""
    return ASCIIJSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def internal_error(_: Request, exc: Exception) -> JSONResponse:
    """A last resort: :class:`_Guard` answers an unexpected error first (with a request id)."""
    return ASCIIJSONResponse({"detail": "internal error"}, status_code=500)


PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    413: {"description": "over a limit of the request"},
    415: {"description": "the body is not sent as JSON"},
    422: {"description": "a bad product (row, field, message) or a body that is not JSON"},
    503: {"description": "the queue or the decoded-image budget is full; retry after Retry-After"},
    504: {"description": "no answer within --request-timeout"},
}


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
    service = Service(
        predictor,
        model_name=model_name,
        candidates=candidates,
        image_root=image_root,
        batch_size=batch_size,
        extractor=extractor,
        extractor_weight=extractor_weight,
        calibration=calibration,
        limits=limits,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        request_timeout=request_timeout,
        batching=batching,
        workers=workers,
    )
    app = FastAPI(
        title="pv2tea",
        summary="Product attribute values from text and image (PV2TEA).",
        lifespan=service.lifespan,
        default_response_class=ASCIIJSONResponse,
        exception_handlers={
            RequestValidationError: invalid_request,
            StarletteHTTPException: http_error,
            Exception: internal_error,
        },
    )
    app.state.service = service
    app.state.batcher, app.state.metrics, app.state.limits = service.batcher, service.metrics, limits
    app.state.budget = service.budget
    app.add_api_route("/health", service.health, methods=["GET"])
    app.add_api_route("/ready", service.ready, methods=["GET"])
    app.add_api_route("/metrics", service.prometheus_metrics, methods=["GET"])
    app.router.add_api_route(
        "/predict",
        service.predict,
        methods=["POST"],
        response_model=PredictResponse,
        response_model_exclude_none=True,
        route_class_override=JSONBodyRoute,
        responses=PREDICT_RESPONSES,
    )
    app.add_middleware(
        _Guard,
        metrics=service.metrics,
        api_key=api_key,
        max_body_bytes=limits.max_body_bytes,
        body_timeout=limits.body_timeout,
    )
    return app
