"""The HTTP endpoint (``pv2tea serve``) on a tiny trained model: answers, kept labels, and every bad request."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from pv2tea.cli import main
from pv2tea.data.validate import load_dataset
from pv2tea.inference.predictor import Predictor
from pv2tea.regularize.grounding import label_in_text
from pv2tea.serve.server import create_app


@pytest.fixture(scope="module")
def served(tiny_trained):
    """The tiny trained model and 16 of its catalog rows (raw and validated)."""
    model, catalog = tiny_trained
    predictor = Predictor.from_checkpoint(model)
    raw = [json.loads(line) for line in Path(catalog["train"]).read_text().splitlines()][:16]
    records = load_dataset(catalog["train"]).records[:16]
    return predictor, catalog, raw, records


def _inline(row: dict, catalog: dict) -> dict:
    """A catalog row as a request product: images inline as base64, no gold or source."""
    folder = Path(catalog["train"]).parent
    images = [base64.b64encode((folder / p).read_bytes()).decode() for p in row["images"]]
    return {
        "id": row["id"],
        "text": row["text"],
        "category": row["category"],
        "attribute": row["attribute"],
        "images": images,
        "label": row["label"],
    }


def test_predict_answers_as_the_python_api(served):
    predictor, catalog, raw, records = served
    client = TestClient(create_app(predictor, model_name="tiny"))
    assert client.get("/health").json()["status"] == "ok"
    response = client.post("/predict", json={"products": [_inline(r, catalog) for r in raw]})
    assert response.status_code == 200, response.text
    answers = response.json()["predictions"]
    expected = predictor.predict(records, 32)
    assert [a["id"] for a in answers] == [r.id for r in records]
    assert [a["values"] for a in answers] == expected
    assert all("kept_label" not in a for a in answers)
    # the model sees each product's own image, decoded in memory (no files): the same tensors as from the files
    seen = []

    def spy(self, records_in, *args, **kwargs):
        seen.extend([(name, self.pre.image_tensor(r, k)) for k, name in enumerate(r.images)] for r in records_in)
        return original(self, records_in, *args, **kwargs)

    original = Predictor.predict
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Predictor, "predict", spy)
        spied = TestClient(create_app(predictor))
        assert spied.post("/predict", json={"products": [_inline(r, catalog) for r in raw]}).status_code == 200
    seen = seen[-len(records) :]  # the warm-up prediction came first
    assert [len(s) for s in seen] == [len(r.images) for r in records] and any(seen)
    for images, record in zip(seen, records):
        for k, (name, tensor) in enumerate(images):
            assert name.startswith("memory:") and torch.equal(tensor, predictor.pre.image_tensor(record, k))
    # kept labels: a row whose text states its label returns the label, the others the model's answer
    kept = client.post("/predict", json={"products": [_inline(r, catalog) for r in raw], "keep_labels": True})
    flags = [label_in_text(r.label, r.text) for r in records]
    assert any(flags) and not all(flags)
    for a, r, p, flag in zip(kept.json()["predictions"], records, expected, flags):
        assert a["kept_label"] is flag and a["values"] == (list(r.label) if flag else p)


def test_the_old_request_field_keeps_labels_warns_once_in_the_log_and_both_names_must_agree(
    served, caplog, monkeypatch
):
    from pv2tea import renamed

    monkeypatch.setattr(renamed, "_WARNED", set())  # as in a fresh server process
    predictor, catalog, raw, records = served
    client = TestClient(create_app(predictor))
    products = [_inline(r, catalog) for r in raw[:8]]
    new = client.post("/predict", json={"products": products, "keep_labels": True})
    assert new.status_code == 200, new.text
    assert any(a["kept_label"] for a in new.json()["predictions"])  # some rows kept their label
    with caplog.at_level("WARNING", logger="pv2tea.serve"):
        old = client.post("/predict", json={"products": products, "keep_grounded": True})
        again = client.post("/predict", json={"products": products, "keep_grounded": True, "keep_labels": True})
    assert old.status_code == again.status_code == 200, (old.text, again.text)
    assert old.json()["predictions"] == again.json()["predictions"] == new.json()["predictions"]
    said = [r.getMessage() for r in caplog.records if "keep_grounded" in r.getMessage()]
    assert said == [
        "the request field keep_grounded is now keep_labels; the old spelling still works but will be removed"
    ]
    off = client.post("/predict", json={"products": products, "keep_grounded": False})
    assert off.status_code == 200 and all("kept_label" not in a for a in off.json()["predictions"])
    both = client.post("/predict", json={"products": products, "keep_grounded": True, "keep_labels": False})
    assert both.status_code == 422
    [problem] = both.json()["detail"]
    assert "keep_grounded" in problem["msg"] and "keep_labels" in problem["msg"]
    # the API description and the answers know only the new name
    schema = client.get("/openapi.json").json()["components"]["schemas"]["PredictRequest"]["properties"]
    assert "keep_labels" in schema and "keep_grounded" not in schema


def test_image_paths_under_the_root_equal_inline_images(served):
    predictor, catalog, raw, _ = served
    folder = Path(catalog["train"]).parent
    client = TestClient(create_app(predictor, image_root=folder))
    by_path = [{**_inline(r, catalog), "images": [], "image_paths": r["images"]} for r in raw[:4]]
    inline = [_inline(r, catalog) for r in raw[:4]]
    a = client.post("/predict", json={"products": by_path}).json()["predictions"]
    b = client.post("/predict", json={"products": inline}).json()["predictions"]
    assert a == b
    escape = {**by_path[0], "image_paths": ["../../etc/passwd"]}
    response = client.post("/predict", json={"products": [escape]})
    assert response.status_code == 422
    assert response.json()["detail"] == [
        {"row": 1, "field": "image_paths[0]", "message": "'../../etc/passwd' is outside the image root"}
    ]


def test_bad_requests_name_the_row_and_field(served):
    predictor, catalog, raw, _ = served
    client = TestClient(create_app(predictor, max_products=3))
    good = _inline(raw[0], catalog)

    def problems(products, **options):
        response = client.post("/predict", json={"products": products, **options})
        assert response.status_code == 422, response.text
        return response.json()["detail"]

    [bad_b64] = problems([good, {**good, "id": "x", "images": ["not base64!"]}])
    assert (bad_b64["row"], bad_b64["field"]) == (2, "images[0]") and "not a base64 image" in bad_b64["message"]
    [not_image] = problems([{**good, "images": [base64.b64encode(b"plain text").decode()]}])
    assert (not_image["row"], not_image["field"]) == (1, "images[0]") and "not an image" in not_image["message"]
    [empty] = problems([{**good, "text": "  "}])
    assert (empty["row"], empty["field"]) == (1, "text")
    [dup] = problems([good, good])
    assert (dup["row"], dup["field"]) == (2, "id") and "duplicate id" in dup["message"]
    [no_root] = problems([{**good, "images": [], "image_paths": ["a.png"]}])
    assert no_root["field"] == "image_paths[0]" and "--image-root" in no_root["message"]
    unlabelled = {k: v for k, v in good.items() if k != "label"}
    assert client.post("/predict", json={"products": [unlabelled]}).status_code == 200
    [no_label] = problems([unlabelled], keep_labels=True)
    assert no_label["field"] == "label" and "keep_labels" in no_label["message"]
    # schema errors (FastAPI/pydantic): an unknown field, a missing one, no products
    for body in ({"products": [{**good, "colour": "red"}]}, {"products": [{"id": "a"}]}, {"products": []}):
        assert client.post("/predict", json=body).status_code == 422
    assert client.post("/predict", json={"products": [good] * 4}).status_code == 413


def test_serve_command(served, monkeypatch, tmp_path, capsys):
    predictor, catalog, raw, _ = served
    started = {}
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: started.update(app=app, host=host, port=port))
    model = Path(catalog["train"]).parent.parent / "run" / "final"  # the tiny_trained layout
    assert main(["serve", "--model", str(model), "--port", "8123"]) == 0
    assert started["host"] == "127.0.0.1" and started["port"] == 8123
    assert TestClient(started["app"]).get("/health").json()["model"] == str(model)
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert main(["serve", "--model", str(model), "--image-root", str(tmp_path / "nowhere")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_predict_fused_with_the_extractor_as_the_python_api(served):
    from pv2tea.baselines import TfidfTextExtractor

    predictor, catalog, raw, records = served
    extractor = TfidfTextExtractor().fit(records)
    cands = {
        a: sorted({v for r in records if r.attribute == a for v in r.label}) for a in {r.attribute for r in records}
    }
    client = TestClient(create_app(predictor, candidates=cands, extractor=extractor, extractor_weight=2.0))
    assert client.get("/health").json()["extractor"] is True
    response = client.post("/predict", json={"products": [_inline(r, catalog) for r in raw]})
    assert response.status_code == 200, response.text
    expected = predictor.predict(
        records, 32, candidates=cands, priors=extractor.value_probabilities(records), prior_weight=2.0
    )
    assert [a["values"] for a in response.json()["predictions"]] == expected
    unknown = {**_inline(raw[0], catalog), "attribute": "sleeve style"}
    bad = client.post("/predict", json={"products": [_inline(raw[1], catalog), unknown]})
    assert bad.status_code == 422
    assert [(p["row"], p["field"]) for p in bad.json()["detail"]] == [(2, "attribute")]
    assert "unknown to the text extractor" in bad.json()["detail"][0]["message"]
    with pytest.raises(ValueError, match="needs candidate lists"):
        create_app(predictor, extractor=extractor)
