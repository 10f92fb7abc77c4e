"""Property-based fuzzing of the HTTP request parser (tiny trained model): random JSON, wrong types, huge numbers,
base64 junk, lone surrogates, deep nesting, long strings in every field. Every body is answered 200 with one
prediction per product, or a clear 4xx — never a 500."""

from __future__ import annotations

import base64
import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pv2tea.inference.predictor import Predictor
from pv2tea.serve.limits import Limits
from pv2tea.serve.server import create_app


@pytest.fixture(scope="module")
def client(tiny_trained):
    model, _ = tiny_trained
    limits = Limits(max_body_bytes=200_000, max_products=4, max_text_chars=2_000)
    return TestClient(create_app(Predictor.from_checkpoint(model), limits=limits, request_timeout=60))


text = st.text(max_size=20) | st.sampled_from(
    ["", "  ", "\u2028", "\x00", "e\u0301", "x" * 2_500, "a\ud800b", "\udfff", "y" * 1_001]
)
number = st.integers(-(2**80), 2**80) | st.floats(allow_nan=False) | st.sampled_from([1e308, -0.0])
anything = st.recursive(
    st.none() | st.booleans() | number | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=6,
)
junk_b64 = (
    st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode())
    | text
    | st.sampled_from(["data:image/png;base64,AAAA", "=", "A" * 300_000])
)
product = st.fixed_dictionaries(
    {
        "id": text | anything,
        "text": text | anything,
        "category": st.sampled_from(["mug", "t-shirt"]) | anything,
        "attribute": st.sampled_from(["color", "pattern"]) | anything,
    },
    optional={
        "images": st.lists(junk_b64, max_size=2) | anything,
        "image_paths": st.lists(text, max_size=2),
        "label": st.lists(text, max_size=2) | anything,
        "colour": text,
    },
)
request = st.fixed_dictionaries(
    {"products": st.lists(product, max_size=5) | anything},
    optional={"num_beams": number | anything, "keep_labels": anything, "keep_grounded": anything},
)
body = (
    request.map(json.dumps)
    | anything.map(json.dumps)
    | st.binary(max_size=60).map(lambda b: b.decode("latin-1"))
    | st.just('{"products": [')
    | st.integers(1, 50_000).map(lambda depth: "[" * depth + "]" * depth)  # nesting
    | st.integers(1, 20_000).map(lambda digits: '{"products": [], "num_beams": ' + "7" * digits + "}")
)


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=body)
def test_every_body_is_answered_or_refused_clearly(client, data):
    response = client.post(
        "/predict", content=data.encode("utf-8", "surrogatepass"), headers={"Content-Type": "application/json"}
    )
    assert response.status_code in (200, 413, 422), (response.status_code, response.text[:500])
    answer = response.json()
    if response.status_code == 200:
        products = json.loads(data)["products"]
        assert [p["id"] for p in answer["predictions"]] == [p["id"].strip() for p in products]
    else:
        assert answer["detail"]
