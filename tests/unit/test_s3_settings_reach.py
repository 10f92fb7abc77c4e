"""S3's scale settings (schemes.knn_exact_below, knn_index, knn_recall, probe_fit_rows) reach the searches."""

from __future__ import annotations

import numpy as np
import pytest

from pv2tea.config import load_config


@pytest.mark.parametrize("nr_visual", ["knn", "probe"])
def test_visual_level_passes_the_scale_settings(tiny_text_ckpt, tmp_path, monkeypatch, nr_visual):
    from conftest import tiny_overrides
    from pv2tea.data.synth import make_catalog
    from pv2tea.data.validate import load_dataset
    from pv2tea.models.build import build_for_training
    from pv2tea.regularize.probe import ProbeFit
    from pv2tea.train import loop

    cfg = load_config(
        None,
        [
            *tiny_overrides(tiny_text_ckpt),
            f"schemes.nr_visual={nr_visual}",
            "schemes.knn_exact_below=7",
            "schemes.knn_index=hnsw",
            "schemes.knn_recall=0.9",
            "schemes.probe_fit_rows=123",
            "schemes.nr_chance=none",
            "train.seed=5",
        ],
    )
    catalog = make_catalog(tmp_path / "c", n_products=6, seed=1, image_size=32)
    records = [r for r in load_dataset(catalog["train"]).records if r.images]
    model, pre = build_for_training(cfg, sorted({r.category for r in records}))
    seen = {}

    def knn(features, labels, k, match, **kwargs):
        seen.update(kwargs, k=k)
        return np.ones(len(labels))

    def probe(features, labels, **kwargs):
        seen.update(kwargs)
        return ProbeFit(reliability=np.full(len(labels), 0.9), prior=np.full(len(labels), 0.5))

    monkeypatch.setattr(loop, "visual_reliability", knn)
    monkeypatch.setattr(loop, "cross_fitted_probe", probe)
    loop._visual_level(model, pre, records, [frozenset(r.label) for r in records], cfg)
    if nr_visual == "knn":
        assert seen == {"k": 3, "exact_below": 7, "index": "hnsw", "recall": 0.9, "seed": 5}
    else:
        assert seen == {"seed": 5, "fit_rows": 123}
