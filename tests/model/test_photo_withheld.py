"""Answering an attribute without its photo: ``Batch.without_images`` reads a row as a product without an image, and a
calibration that does not trust the photo for an attribute answers it so (decoding/generate.py)."""

from __future__ import annotations

from dataclasses import replace

import torch
from test_model import build, image_paths, make_batch, records, single_thread  # noqa: F401  (fixtures)

from pv2tea.decoding.calibration import Calibration, Choice
from pv2tea.decoding.generate import generate_values

CANDIDATES = {"color": ["red", "green", "blue", "grey", "white"]}


def calibration(image: bool, weight: float = 1.0) -> Calibration:
    return Calibration(Choice(weight, weight, 0, 0, 0, 0, 0, True, "pooled", image), {})


def test_withheld_photos_answer_as_products_without_images(tiny_text_ckpt, image_paths):  # noqa: F811
    model, pre = build(tiny_text_ckpt, "fusion.visual_gate=1.0")
    model.eval()
    rows = records(image_paths)
    batch = make_batch(pre, rows)
    blind = make_batch(pre, [replace(r, images=()) for r in rows])
    hide = torch.tensor([True, False, True, True])
    with torch.no_grad():
        hidden = model.encode(batch.without_images(hide)).memory
        expected = model.encode(blind).memory
        shown = model.encode(batch).memory
    torch.testing.assert_close(hidden[hide], expected[hide], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(hidden[~hide], shown[~hide], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(shown[0], expected[0])  # the photo does change what the model reads

    # a calibration that withholds the photo answers as the model does on the rows without their images
    priors = [{c: 1.0 / len(CANDIDATES["color"]) for c in CANDIDATES["color"]} for _ in rows]
    without = [replace(r, images=()) for r in rows]
    scores = {}
    for name, recs, cal in (
        ("withheld", rows, calibration(image=False)),
        ("no_images", without, calibration(image=True)),
        ("shown", rows, calibration(image=True)),
    ):
        scores[name] = generate_values(model, pre, recs, 4, candidates=CANDIDATES, priors=priors, calibration=cal)
    assert scores["withheld"] == scores["no_images"]
    with torch.no_grad():
        from pv2tea.decoding.generate import candidate_log_probs

        a = candidate_log_probs(model, pre, batch.without_images(torch.ones(4, dtype=torch.bool)), rows, CANDIDATES)
        b = candidate_log_probs(model, pre, blind, without, CANDIDATES)
    for (ca, sa), (cb, sb) in zip(a, b):
        assert ca == cb
        torch.testing.assert_close(torch.as_tensor(sa), torch.as_tensor(sb), atol=1e-5, rtol=1e-4)
