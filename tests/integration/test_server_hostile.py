"""Hostile input against the service, second pass, on the tiny trained model: elongated images, lone
surrogates, unbounded strings, unparseable bodies, internal errors, slow decoding under a timeout, decoded memory,
and slow clients. Each test reproduces the attack and checks the answer by value."""

from __future__ import annotations

import base64
import io
import json
import logging
import socket
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from png_checks import png_claiming
from pv2tea.inference.predictor import Predictor
from pv2tea.serve import server as server_module
from pv2tea.serve.limits import Limits
from pv2tea.serve.server import create_app


def png(size: tuple[int, int], colour: tuple[int, int, int] = (200, 10, 10)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def predictor(tiny_trained):
    model, _ = tiny_trained
    return Predictor.from_checkpoint(model)


@pytest.fixture(scope="module")
def product(tiny_trained):
    _, catalog = tiny_trained
    row = json.loads(Path(catalog["train"]).read_text().splitlines()[0])
    return {
        "id": row["id"],
        "text": row["text"],
        "category": row["category"],
        "attribute": row["attribute"],
        "images": [png((16, 16))],
    }


def post_raw(client: TestClient, body: object, **headers: str):
    """POST a body that httpx's own JSON encoding would refuse (lone surrogates): escaped, as a client sends it."""
    return client.post(
        "/predict", content=json.dumps(body).encode(), headers={"Content-Type": "application/json", **headers}
    )


def detail(response) -> list[tuple[int, str, str]]:
    return [(p["row"], p["field"], p["message"]) for p in response.json()["detail"]]


def test_elongated_images_are_refused_by_aspect_ratio_before_decoding(predictor, product, monkeypatch):
    app = create_app(predictor, limits=Limits(max_aspect_ratio=20))
    client = TestClient(app)
    assert app.state.batcher.ready.wait(30)  # (the warm-up's image is not the request's)
    decoded = []
    original = ImageFile.ImageFile.load  # the decoding of an image file's pixels
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or original(self))
    for size in [(20_000, 1), (1, 20_000), (40_000_000, 1)]:
        response = client.post(
            "/predict", json={"products": [{**product, "images": [base64.b64encode(png_claiming(*size)).decode()]}]}
        )
        assert response.status_code == 422, response.text
        [(row, field, message)] = detail(response)
        assert (row, field) == (1, "images[0]") and "at most 20:1 (--max-aspect-ratio)" in message
    assert decoded == []
    wide = client.post("/predict", json={"products": [{**product, "images": [png((400, 20))]}]})  # 20:1 passes
    assert wide.status_code == 200, wide.text
    assert 'pv2tea_images_rejected_total{reason="aspect"} 3.0' in client.get("/metrics").text


def test_lone_surrogates_are_refused_with_row_and_field(predictor, product, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    client = TestClient(create_app(predictor, image_root=root))
    for field, value in [
        ("text", "blue \ud800 mug"),
        ("category", "\udfffmug"),
        ("attribute", "col\ud800or"),
        ("id", "p\ud800"),
    ]:
        response = post_raw(client, {"products": [product, {**product, "id": "second", field: value}]})
        assert response.status_code == 422, (field, response.status_code, response.text)
        [(row, name, message)] = detail(response)
        assert (row, name) == (2, field) and "not valid Unicode" in message and "U+D" in message
    labelled = post_raw(client, {"products": [{**product, "label": ["red", "\ud800"]}]})
    assert labelled.status_code == 422 and detail(labelled)[0][:2] == (1, "label")
    path = post_raw(client, {"products": [{**product, "images": [], "image_paths": ["a\ud800.png"]}]})
    assert path.status_code == 422 and detail(path)[0][:2] == (1, "image_paths[0]")
    twice = post_raw(client, {"products": [{**product, "id": "p\ud800"}, {**product, "id": "p\ud800"}]})
    assert twice.status_code == 422 and json.loads(twice.content)  # the quoted id stays encodable


def test_lone_surrogates_in_a_data_file_are_reported_or_skipped(tiny_trained, tmp_path, capsys):
    from pv2tea.cli import main

    model, catalog = tiny_trained
    rows = [json.loads(line) for line in Path(catalog["train"]).read_text().splitlines()[:3]]
    rows[1]["text"] = "a \ud800 mug"
    rows[2]["category"] = "\udc00"
    data = tmp_path / "rows.jsonl"
    folder = Path(catalog["train"]).parent
    for r in rows:
        r["images"] = [str(folder / p) for p in r["images"]]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")  # json.dumps escapes them: \ud800
    assert main(["data", "validate", str(data), "--unlabelled"]) == 1
    out = capsys.readouterr().out
    assert f"{data} row 2, field 'text': 'text' is not valid Unicode" in out
    assert f"{data} row 3, field 'category'" in out and "U+DC00" in out
    assert main(["predict", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "p.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "row 2, field 'text'" in err and "Traceback" not in err
    out_file = tmp_path / "skipped.jsonl"
    assert main(["predict", "--model", str(model), "--data", str(data), "--out", str(out_file), "--skip-invalid"]) == 0
    assert len(out_file.read_text().splitlines()) == 1 and "2 invalid row(s)" in capsys.readouterr().err


def test_an_internal_error_answers_a_request_id_and_logs_the_details(predictor, product, monkeypatch, caplog):
    app = create_app(predictor)
    client = TestClient(app)
    assert app.state.batcher.ready.wait(30)

    def broken(self, *args, **kwargs):
        raise OverflowError("secret detail at /srv/models/x")

    monkeypatch.setattr(Predictor, "predict", broken)
    with caplog.at_level(logging.ERROR, logger="pv2tea.serve"):
        response = client.post("/predict", json={"products": [product]})
    assert response.status_code == 500
    body = response.json()
    assert "OverflowError" not in response.text and "secret" not in response.text
    request_id = body["request_id"]
    assert len(request_id) == 32 and response.headers["x-request-id"] == request_id and request_id in body["detail"]
    [record] = [r for r in caplog.records if request_id in r.getMessage()]
    assert record.exc_info is not None and "secret detail" in str(record.exc_info[1])


FIELDS = ("id", "category", "attribute", "label", "image_paths")


@pytest.fixture(scope="module")
def short_client(predictor, tmp_path_factory):
    root = tmp_path_factory.mktemp("image_root")
    Image.new("RGB", (16, 16), "blue").save(root / ("b" * 12 + ".png"))
    limits = Limits(max_field_chars=12, max_labels=3, max_text_chars=200)
    return TestClient(create_app(predictor, limits=limits, image_root=root))


@settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(field=st.sampled_from(FIELDS), length=st.integers(1, 40), labels=st.integers(0, 6))
def test_every_string_field_and_the_label_list_have_a_limit(short_client, product, field, length, labels):
    value = "b" * length
    changed = {**product, "label": ["red"] * labels}
    if field == "label":
        changed["label"] = [value] * max(labels, 1)
    elif field == "image_paths":
        changed |= {"images": [], "image_paths": [value + ".png"]}
    else:
        changed[field] = value
    response = short_client.post("/predict", json={"products": [changed], "keep_labels": False})
    expected = set()
    too_many_labels = len(changed["label"]) > 3
    if too_many_labels:
        expected.add("label")  # (then its values are not looked at one by one)
    if len(value) + (4 if field == "image_paths" else 0) > 12 and not (field == "label" and too_many_labels):
        expected.add("label[0]" if field == "label" else "image_paths[0]" if field == "image_paths" else field)
    if expected:
        assert response.status_code == 422, response.text
        problems = detail(response)
        assert {f for _, f, _ in problems} >= expected and all(row == 1 for row, _, _ in problems)
        assert all(("--max-field-chars" in m) or ("--max-labels" in m) for _, f, m in problems if f in expected), (
            problems
        )
    elif field == "image_paths" and length != 12:  # a name within the limit but no such file
        assert response.status_code == 422 and detail(response)[0][1] == "image_paths[0]"
    else:
        assert response.status_code == 200, response.text


def test_a_huge_category_is_refused_before_the_model(short_client, product, monkeypatch):
    calls = []
    original = Predictor.predict
    monkeypatch.setattr(Predictor, "predict", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    t0 = time.perf_counter()
    response = short_client.post("/predict", json={"products": [{**product, "category": "c" * 2_000_000}]})
    assert response.status_code == 422 and time.perf_counter() - t0 < 5
    assert detail(response) == [(1, "category", "2,000,000 characters; at most 12 (--max-field-chars)")]
    assert len(response.content) < 1_000 and calls == []


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"products": [{"id": "\xff\xfe"}]}', "not UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"products": [], "num_beams": ' + b"9" * 100_000 + b"}", "too many digits"),
        (b'{"products": [', "Expecting value"),
    ],
)
def test_an_unparseable_body_is_422_saying_why(predictor, body, says):
    client = TestClient(create_app(predictor))
    response = client.post("/predict", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    [problem] = response.json()["detail"]
    assert problem["type"] == "json_invalid" and "not JSON" in problem["msg"] and says in problem["msg"]


def test_a_body_not_sent_as_json_is_415(predictor, product):
    client = TestClient(create_app(predictor))
    body = json.dumps({"products": [product]}).encode()
    for headers in ({"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"}, {}):
        response = client.post("/predict", content=body, headers=headers)
        assert response.status_code == 415, (headers, response.text)
        assert "Content-Type: application/json" in response.json()["detail"]
    ok = client.post("/predict", content=body, headers={"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200, ok.text


@pytest.fixture
def slow_decoding(monkeypatch):
    """Every image decode takes 0.2 s more; returns the (start time, image size) of each decode."""
    started: list[tuple[float, tuple[int, int]]] = []
    original = server_module.open_image

    def slow(raw, limits):
        image = original(raw, limits)
        started.append((time.monotonic(), image.size))
        time.sleep(0.2)
        return image

    monkeypatch.setattr(server_module, "open_image", slow)
    return started


def distinct_images(n: int, size: tuple[int, int] = (16, 16)) -> list[str]:
    return [png(size, (k, 255 - k, 7)) for k in range(n)]


def test_one_clients_images_do_not_hold_anothers_back(predictor, product, slow_decoding):
    """Two products of 8 images (3.2 s of decoding on one thread), then a request of one image: it waits for one
    image of the first request at a time, not for all 16."""
    app = create_app(predictor, workers=1, request_timeout=30)
    client = TestClient(app)
    assert app.state.batcher.ready.wait(30)
    images = distinct_images(16)
    big = [{**product, "id": f"big{k}", "images": images[8 * k : 8 * k + 8]} for k in range(2)]
    answers: dict[str, tuple[int, float]] = {}

    def send(name: str, products: list[dict]) -> None:
        t0 = time.monotonic()
        status = client.post("/predict", json={"products": products}).status_code
        answers[name] = (status, time.monotonic() - t0)

    first = threading.Thread(target=send, args=("big", big))
    first.start()
    time.sleep(0.3)
    send("small", [{**product, "images": [png((10, 10), (1, 2, 3))]}])
    first.join(30)
    assert answers["big"][0] == 200 and answers["small"][0] == 200
    assert answers["small"][1] < 1.5, answers  # before: ~3 s, behind the whole of the first request
    assert answers["big"][1] > 3.2


def test_a_timed_out_request_stops_decoding(predictor, product, slow_decoding):
    app = create_app(predictor, workers=1, request_timeout=1.0)
    client = TestClient(app)
    assert app.state.batcher.ready.wait(30)
    products = [{**product, "id": f"p{k}", "images": distinct_images(16)[8 * k : 8 * k + 8]} for k in range(2)]
    response = client.post("/predict", json={"products": products})
    timed_out = time.monotonic()
    assert response.status_code == 504
    time.sleep(0.8)
    late = [t for t, _ in slow_decoding if t > timed_out + 0.25]
    assert late == [] and len(slow_decoding) <= 7, len(slow_decoding)  # before: all 16, ~2 s past the 504
    assert app.state.budget.in_use == 0
    text = client.get("/metrics").text
    assert "pv2tea_decoded_image_bytes 0.0" in text and "pv2tea_rows_predicted_total 0.0" in text


def test_decoded_images_are_bounded_and_nothing_is_decoded_for_an_invalid_request(predictor, product, slow_decoding):
    one = 3 * 32 * 32 * 4  # a decoded image as the tiny model reads it: float32 (3, 32, 32)
    app = create_app(predictor, limits=Limits(max_decoded_bytes=3 * one), max_wait_ms=600)
    client = TestClient(app)
    assert app.state.batcher.ready.wait(30)
    images = distinct_images(4)
    # 1,024 products × 8 copies of one image, the last row invalid: nothing is decoded (before: 8,192 decodes)
    copies = [{**product, "id": f"c{k}", "images": [images[0]] * 8} for k in range(1024)]
    copies[-1]["text"] = " "
    response = client.post("/predict", json={"products": copies})
    assert response.status_code == 422 and detail(response) == [(1024, "text", "'text' is empty or whitespace-only")]
    assert slow_decoding == []
    # the same image 8 times (and in two products) is decoded once; only the first one of a product reaches the model
    twice = [{**product, "id": f"t{k}", "images": [images[0]] * 8} for k in range(2)]
    assert client.post("/predict", json={"products": twice}).status_code == 200
    assert len(slow_decoding) == 1
    # four distinct images read by the model need 4 × one bytes: more than the whole budget
    four = [{**product, "id": f"f{k}", "images": [images[k]]} for k in range(4)]
    too_many = client.post("/predict", json={"products": four})
    assert too_many.status_code == 413 and "--max-decoded-bytes" in too_many.json()["detail"]
    # two requests of two images do not fit together: the second is told to retry (503), not queued
    results: dict[str, int] = {}

    def send(name: str, products: list[dict]) -> None:
        results[name] = client.post("/predict", json={"products": products}).status_code

    first = threading.Thread(target=send, args=("first", four[:2]))
    first.start()
    deadline = time.monotonic() + 5
    while app.state.budget.in_use == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    second = client.post("/predict", json={"products": four[2:]})
    first.join(30)
    assert results["first"] == 200 and second.status_code == 503 and second.headers["retry-after"] == "1"
    assert "--max-decoded-bytes" in second.json()["detail"]
    assert app.state.budget.in_use == 0 and client.post("/predict", json={"products": four[2:]}).status_code == 200


def test_serve_passes_every_limit_to_the_app_and_uvicorn(tiny_trained, monkeypatch):
    import uvicorn

    from pv2tea.cli import main

    model, _ = tiny_trained
    started: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(app=app, **kw))
    options = {
        "--max-image-pixels": "1000",
        "--max-aspect-ratio": "5",
        "--max-field-chars": "7",
        "--max-labels": "2",
        "--max-decoded-bytes": "123456",
        "--header-timeout": "2.5",
        "--body-timeout": "3.5",
        "--max-connections": "9",
    }
    assert main(["serve", "--model", str(model), *[a for kv in options.items() for a in kv]]) == 0
    limits = started["app"].state.limits
    assert (limits.max_image_pixels, limits.max_aspect_ratio, limits.max_field_chars, limits.max_labels) == (
        1000,
        5,
        7,
        2,
    )
    assert (limits.max_decoded_bytes, limits.header_timeout, limits.body_timeout) == (123456, 2.5, 3.5)
    assert started["app"].state.budget.total == 123456
    assert started["limit_concurrency"] == 9 and started["http"].__name__ == "HeaderTimeoutProtocol"


@pytest.fixture
def live_server(predictor):
    """The app under uvicorn on a free loopback port, with short header and body timeouts and 3 connections."""
    import uvicorn

    from pv2tea.serve.connections import uvicorn_options

    limits = Limits(header_timeout=0.5, body_timeout=0.5, max_connections=3)
    config = uvicorn.Config(
        create_app(predictor, limits=limits), host="127.0.0.1", port=0, log_level="warning", **uvicorn_options(limits)
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield port
    server.should_exit = True
    thread.join(10)


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return sock


def _read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed it."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic()


def test_slow_clients_are_cut_off_and_connections_limited(live_server):
    port = live_server
    # headers that never end: 408 and closed after the header timeout (before: held open indefinitely)
    slow_head = _connect(port)
    t0 = time.monotonic()
    slow_head.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
    answer, closed = _read_until_closed(slow_head)
    assert answer.startswith(b"HTTP/1.1 408") and b"--header-timeout" in answer and 0.4 < closed - t0 < 3
    # a body that stops half way: 408 and closed after the body timeout
    slow_body = _connect(port)
    t0 = time.monotonic()
    slow_body.sendall(
        b'POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"pro'
    )
    answer, closed = _read_until_closed(slow_body)
    assert answer.startswith(b"HTTP/1.1 408") and b"--body-timeout" in answer and 0.4 < closed - t0 < 3
    # a keep-alive connection that starts a second request and stalls is cut off too
    again = _connect(port)
    again.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    first = again.recv(65536)
    assert first.startswith(b"HTTP/1.1 200")
    again.sendall(b"GET /health HTTP/1.1\r\n")
    answer, _ = _read_until_closed(again)
    assert b"408" in answer
    # two idle connections open: a request on a third is answered 503 (--max-connections 3)
    idle = [_connect(port), _connect(port)]
    time.sleep(0.1)
    third = _connect(port)
    third.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert _read_until_closed(third)[0].startswith(b"HTTP/1.1 503")
    for sock in idle:
        sock.close()
    time.sleep(0.1)
    fourth = _connect(port)
    fourth.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert _read_until_closed(fourth)[0].startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
        ("example.org", False),
    ],
)
def test_is_loopback(host, loopback):
    from pv2tea.serve.connections import is_loopback

    assert is_loopback(host) is loopback


def test_serve_warns_when_it_listens_beyond_loopback_without_an_api_key(tiny_trained, monkeypatch, tmp_path, capsys):
    """Issue 38, item 12: --host 0.0.0.0 without a key started silently although the guide advises against it."""
    import uvicorn

    from pv2tea.cli import main

    model, _ = tiny_trained
    started: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(app=app, **kw))
    monkeypatch.delenv("PV2TEA_API_KEY", raising=False)
    key = tmp_path / "key.txt"
    key.write_text("s3cret\n")

    def warned(*args: str) -> bool:
        started.clear()
        assert main(["serve", "--model", str(model), *args]) == 0 and started["app"] is not None
        err = capsys.readouterr().err
        return "warning:" in err and "no API key" in err

    assert warned("--host", "0.0.0.0")
    assert started["host"] == "0.0.0.0"  # a warning, not a refusal
    assert not warned("--host", "0.0.0.0", "--api-key-file", str(key))
    assert not warned()  # the default 127.0.0.1
    monkeypatch.setenv("PV2TEA_API_KEY", "s3cret")
    assert not warned("--host", "0.0.0.0")


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(products=st.integers(1, 3), per_product=st.integers(3, 8), workers=st.integers(1, 2))
def test_any_request_that_times_out_stops_decoding(predictor, product, slow_decoding, products, per_product, workers):
    """Decode under a timeout, whatever the request's shape: once the 504 is sent, no decode of it starts later and
    its decoded bytes are given back."""
    slow_decoding.clear()
    app = create_app(predictor, workers=workers, request_timeout=0.5)
    client = TestClient(app)
    assert app.state.batcher.ready.wait(30)
    images = distinct_images(products * per_product)
    body = [
        {**product, "id": f"p{k}", "images": images[per_product * k : per_product * (k + 1)]} for k in range(products)
    ]
    if products * per_product * 0.2 / workers < 1.0:  # decodes well within the timeout: nothing to cut short
        return
    response = client.post("/predict", json={"products": body})
    timed_out = time.monotonic()
    assert response.status_code == 504
    time.sleep(0.5)
    assert [t for t, _ in slow_decoding if t > timed_out + 0.25] == []
    assert len(slow_decoding) < products * per_product  # the request's later images were never decoded
    assert app.state.budget.in_use == 0
