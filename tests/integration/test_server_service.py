"""The service under load and hostile input (tiny trained model): coalesced requests, 503/504, /ready,
/metrics, the API key, and each request limit with its own 4xx."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from png_checks import png_claiming
from pv2tea.data.validate import load_dataset
from pv2tea.inference.predictor import Predictor
from pv2tea.serve.limits import Limits
from pv2tea.serve.server import create_app


@pytest.fixture(scope="module")
def served(tiny_trained):
    model, catalog = tiny_trained
    predictor = Predictor.from_checkpoint(model)
    rows = [json.loads(line) for line in Path(catalog["train"]).read_text().splitlines()][:16]
    folder = Path(catalog["train"]).parent
    products = [
        {
            "id": r["id"],
            "text": r["text"],
            "category": r["category"],
            "attribute": r["attribute"],
            "images": [base64.b64encode((folder / p).read_bytes()).decode() for p in r["images"]],
        }
        for r in rows
    ]
    return predictor, catalog, products, load_dataset(catalog["train"]).records[:16]


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample of a Prometheus text exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if m and (m.group(1) or "") == want:
            return float(m.group(2))
    return 0.0


def test_concurrent_requests_are_coalesced_and_each_gets_its_own_rows(served):
    predictor, _, products, records = served
    app = create_app(predictor, batch_size=16, max_wait_ms=2000)
    client = TestClient(app)
    answers: dict[int, dict] = {}

    def send(n: int) -> None:
        answers[n] = client.post("/predict", json={"products": products[2 * n : 2 * n + 2]}).json()

    threads = [threading.Thread(target=send, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    expected = predictor.predict(records, 16)
    for n in range(8):
        got = answers[n]["predictions"]
        assert [a["id"] for a in got] == [r.id for r in records[2 * n : 2 * n + 2]]
        assert [a["values"] for a in got] == expected[2 * n : 2 * n + 2]
    text = client.get("/metrics").text
    # the 8 requests of 2 rows each filled one batch of 16 rows (before the 2 s wait ran out)
    assert metric(text, "pv2tea_batch_rows_bucket", le="8.0") == 0 and metric(text, "pv2tea_batch_rows_count") == 1
    assert metric(text, "pv2tea_rows_predicted_total") == 16  # the warm-up prediction is not counted
    assert metric(text, "pv2tea_requests_total", route="/predict", status="200") == 8


def test_overload_answers_503_with_retry_after_and_a_slow_request_504(served):
    predictor, _, products, _ = served
    app = create_app(predictor, max_queue=1, max_wait_ms=1500, request_timeout=0.8)
    client = TestClient(app)
    app.state.batcher.ready.wait(10)
    results: dict[str, object] = {}

    def send(name: str, **options) -> None:
        results[name] = client.post("/predict", json={"products": products[:1], **options})

    slow = threading.Thread(target=send, args=("slow",))  # taken by the model thread, waits 1.5 s for more
    slow.start()
    time.sleep(0.3)
    queued = threading.Thread(target=send, args=("queued",), kwargs={"num_beams": 2})  # cannot join: it waits
    queued.start()
    deadline = time.monotonic() + 5
    while not app.state.batcher.depth and time.monotonic() < deadline:
        time.sleep(0.01)
    send("refused")
    refused = results["refused"]
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "busy" in refused.json()["detail"]
    slow.join(10)
    queued.join(10)
    for name in ("slow", "queued"):
        assert results[name].status_code == 504 and "--request-timeout" in results[name].json()["detail"]
    time.sleep(0.8)  # the model thread's 1.5 s wait ends: the abandoned requests are skipped, never predicted
    text = client.get("/metrics").text
    assert metric(text, "pv2tea_rows_predicted_total") == 0
    assert metric(text, "pv2tea_requests_total", route="/predict", status="503") == 1


def test_ready_metrics_and_api_key(served):
    predictor, _, products, _ = served
    with TestClient(create_app(predictor, api_key="s3cret key")) as client:
        assert client.app.state.batcher.ready.wait(10)
        assert client.get("/ready").json()["status"] == "ready" and client.get("/health").status_code == 200
        body = {"products": products[:2]}
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"X-API-Key": "s3cret"},
            {"Authorization": "s3cret key"},
        ):
            response = client.post("/predict", json=body, headers=headers)
            assert response.status_code == 401 and "API key" in response.json()["detail"]
            assert response.headers["www-authenticate"] == "Bearer"
        assert client.get("/metrics").status_code == 401
        ok = {"Authorization": "Bearer s3cret key"}
        assert client.post("/predict", json=body, headers=ok).status_code == 200
        assert client.post("/predict", json=body, headers={"X-API-Key": "s3cret key"}).status_code == 200
        bad = {"products": [{**products[0], "images": ["not base64!"]}]}
        assert client.post("/predict", json=bad, headers=ok).status_code == 422
        metrics = client.get("/metrics", headers=ok)
        assert metrics.headers["content-type"].startswith("text/plain")
        text = metrics.text
        assert metric(text, "pv2tea_requests_total", route="/predict", status="401") == 4
        assert metric(text, "pv2tea_requests_total", route="/predict", status="200") == 2
        assert metric(text, "pv2tea_requests_total", route="/metrics", status="401") == 1
        assert metric(text, "pv2tea_images_rejected_total", reason="base64") == 1
        assert metric(text, "pv2tea_rows_predicted_total") == 4
        assert metric(text, "pv2tea_request_seconds_count", route="/predict") == 7
        assert metric(text, "pv2tea_queue_depth") == 0


def test_not_ready_until_warmed(served, monkeypatch):
    predictor, _, _, _ = served
    gate = threading.Event()
    original = Predictor.predict
    monkeypatch.setattr(Predictor, "predict", lambda self, *a, **k: gate.wait(10) and original(self, *a, **k))
    client = TestClient(create_app(predictor))
    not_yet = client.get("/ready")
    assert not_yet.status_code == 503 and not_yet.json()["status"] == "warming up"
    gate.set()
    assert client.app.state.batcher.ready.wait(10) and client.get("/ready").status_code == 200


def _png(size: tuple[int, int], fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def test_each_limit_has_its_own_clear_4xx(served, tmp_path):
    predictor, _, products, _ = served
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside.png").write_bytes(base64.b64decode(_png((8, 8))))
    (root / "leak.png").symlink_to(tmp_path / "outside.png")
    limits = Limits(
        max_body_bytes=60_000,
        max_products=4,
        max_text_chars=300,
        max_images_per_product=2,
        max_image_bytes=20_000,
        max_image_pixels=64 * 64,
        formats=("PNG",),
    )
    client = TestClient(create_app(predictor, limits=limits, image_root=root))
    good = products[0]
    assert client.post("/predict", json={"products": [good]}).status_code == 200

    def refused(product: dict, status: int = 422) -> dict:
        response = client.post("/predict", json={"products": [product]})
        assert response.status_code == status, response.text
        [problem] = response.json()["detail"]
        return problem

    cases = [
        ({"text": "x" * 301}, "text", "--max-text-chars"),
        ({"images": [_png((8, 8))] * 3}, "images", "--max-images"),
        ({"images": [_png((65, 64))]}, "images[0]", "pixels"),
        ({"images": [base64.b64encode(png_claiming(50_000, 50_000)).decode()]}, "images[0]", "pixels"),
        ({"images": [_png((8, 8), "GIF")]}, "images[0]", "format GIF is not allowed"),
        ({"images": ["A" * 40_000]}, "images[0]", "larger than"),
        ({"images": [], "image_paths": ["leak.png"]}, "image_paths[0]", "outside the image root"),
    ]
    for change, field, message in cases:
        problem = refused({**good, **change})
        assert problem["row"] == 1 and problem["field"] == field and message in problem["message"], problem
    too_many = client.post("/predict", json={"products": [good] * 5})
    assert too_many.status_code == 413 and "--max-products" in too_many.json()["detail"]
    big = client.post("/predict", json={"products": [{**good, "text": "y" * 70_000}]})
    assert big.status_code == 413 and "--max-body-bytes" in big.json()["detail"]

    def chunks():  # no Content-Length: the limit is counted while the body streams in
        yield b'{"products": [{"id": "a", "text": "'
        for _ in range(100):
            yield b"z" * 1000
        yield b'", "category": "c", "attribute": "color"}]}'

    streamed = client.post("/predict", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413 and "--max-body-bytes" in streamed.json()["detail"]
    junk = client.post("/predict", content=b'{"products": [', headers={"Content-Type": "application/json"})
    assert junk.status_code == 422 and "input" not in junk.json()["detail"][0]
    text = client.get("/metrics").text
    assert {
        reason: metric(text, "pv2tea_images_rejected_total", reason=reason)
        for reason in ("count", "pixels", "format", "bytes", "path")
    } == {"count": 1, "pixels": 2, "format": 1, "bytes": 1, "path": 1}
