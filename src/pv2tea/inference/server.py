"""An HTTP endpoint for a trained model (FastAPI): ``POST /predict`` and ``GET /health``.

A request carries products in the dataset schema; their images come inline (base64 in ``images``) or, when
the server was started with an image root, as file names under it (``image_paths``). Each request is checked
with the same row validation as a dataset file, so a bad product is answered with HTTP 422 naming its row
(1-based position in ``products``), field and problem, and nothing is predicted for that request. The answers
are the rows ``pv2tea predict`` writes (:func:`pv2tea.inference.predictor.prediction_rows`).

Start it with ``pv2tea serve --model RUN/final``; the interactive API description is at ``/docs``.
"""

from __future__ import annotations

import base64
import binascii
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from pv2tea.data.validate import validate_rows
from pv2tea.inference import fusion
from pv2tea.inference.predictor import Predictor, prediction_rows

if TYPE_CHECKING:  # only for annotations: the extractor's libraries load when --extractor is used
    from pv2tea.baselines.text_extractor import TextExtractor

MAX_IMAGE_BYTES = 20 * 2**20  # per inline image, decoded


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


def _problem(row: int, field: str, message: str) -> dict[str, Any]:
    return {"row": row, "field": field, "message": message}


def _decode_image(data: str) -> bytes:
    if data.startswith("data:"):
        data = data.partition(",")[2]
    raw = base64.b64decode(data, validate=True)
    if len(raw) > MAX_IMAGE_BYTES:
        raise ValueError(f"image is larger than {MAX_IMAGE_BYTES // 2**20} MiB")
    return raw


def _under_root(root: Path, name: str) -> Path | None:
    """``root/name`` when it stays inside ``root`` (no absolute paths or '..' escapes), else None."""
    path = (root / name).resolve()
    return path if path.is_relative_to(root) else None


def _rows(request: PredictRequest, folder: Path, image_root: Path | None) -> tuple[list[dict], list[dict]]:
    """Raw dataset rows for the request, inline images written into ``folder``; and the problems found."""
    rows, problems = [], []
    for n, product in enumerate(request.products, start=1):
        row = product.model_dump(exclude={"images", "image_paths"}, exclude_defaults=True)  # no label: unlabelled
        images: list[str] = []
        for k, data in enumerate(product.images):
            try:
                raw = _decode_image(data)
            except (binascii.Error, ValueError) as exc:
                problems.append(_problem(n, f"images[{k}]", f"not a base64 image: {exc}"))
                continue
            name = f"row{n}.images[{k}]"
            (folder / name).write_bytes(raw)
            images.append(name)
        for k, name in enumerate(product.image_paths):
            path = _under_root(image_root, name) if image_root is not None else None
            if image_root is None:
                problems.append(_problem(n, f"image_paths[{k}]", "this server has no --image-root; send the "
                                                                  "image inline in 'images' (base64)"))
            elif path is None:
                problems.append(_problem(n, f"image_paths[{k}]", f"'{name}' is outside the image root"))
            else:
                images.append(str(path))
        row["images"] = images
        rows.append(row)
    return rows, problems


def create_app(predictor: Predictor, *, model_name: str = "", candidates: Mapping | None = None,
               image_root: str | Path | None = None, batch_size: int = 32, max_products: int = 1024,
               extractor: TextExtractor | None = None, extractor_weight: float = 1.0) -> FastAPI:
    """The FastAPI application serving ``predictor`` (one request predicts at a time; torch uses the cores).

    With ``extractor`` (and ``candidates``) candidate ranking is fused with the extractor's probabilities.
    """
    fusion.check_fusion(candidates, extractor)
    root = Path(image_root).resolve() if image_root is not None else None
    lock = threading.Lock()
    app = FastAPI(title="pv2tea", summary="Product attribute values from text and image (PV2TEA).")

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "images": predictor.model.visual is not None,
                "candidates": candidates is not None, "extractor": extractor is not None,
                "max_products": max_products}

    @app.post("/predict", response_model=PredictResponse, response_model_exclude_none=True)
    def predict(request: PredictRequest) -> dict[str, Any]:
        if len(request.products) > max_products:
            raise HTTPException(413, f"{len(request.products)} products in one request; at most {max_products}")
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="pv2tea-request-") as tmp:
            folder = Path(tmp)
            rows, problems = _rows(request, folder, root)
            records, invalid = validate_rows(rows, folder / "request", require_label=False)
            problems += [_problem(e.row, e.field, e.message) for _, errors in invalid for e in errors]
            if extractor is not None and not invalid:
                problems += [_problem(n, "attribute", f"'{r.attribute}' is unknown to the text extractor (it knows "
                                                      f"{', '.join(sorted(extractor.vocabularies))})")
                             for n, r in enumerate(records, 1) if r.attribute not in extractor.vocabularies]
            if problems:
                raise HTTPException(422, sorted(problems, key=lambda p: p["row"]))
            if request.keep_grounded and not any(r.label for r in records):
                raise HTTPException(422, [_problem(0, "label", "keep_grounded needs the products' existing "
                                                               "values in 'label'; none has one")])
            with lock:
                priors = extractor.value_probabilities(records) if extractor is not None else None
                preds = predictor.predict(records, batch_size, request.num_beams, candidates=candidates,
                                          priors=priors, prior_weight=extractor_weight)
        return {"predictions": prediction_rows(records, preds, request.keep_grounded),
                "seconds": time.perf_counter() - t0}

    return app
