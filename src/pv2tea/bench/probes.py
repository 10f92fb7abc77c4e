"""Image-only anchors of a benchmark: linear probes on the frozen visual backbone's pooled features.

What a photo alone tells with the features pv2tea's visual encoder starts from: per attribute, a logistic regression
(C = 0.1) on standardized features — the backbone's final feature map and its ``vision.extra_levels`` maps, each
average-pooled over the image — trained on a fold's training rows and applied to its held-out rows. ``probe_weak``
learns the weak labels (what PV2TEA learns from), ``probe_gold`` the gold values (the ceiling of frozen features).
The features are computed once per photo and kept in ``features.npz`` next to the runs, keyed by the photo paths.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from pv2tea.config import VisionConfig
from pv2tea.data.images import load_rgb
from pv2tea.data.schema import Record

__all__ = ["PROBE_ROWS", "image_features", "probe_answers"]

PROBE_ROWS = ("probe_weak", "probe_gold")
PROBE_C = 0.1


def _key(paths: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(paths).encode()).hexdigest()


@torch.no_grad()
def image_features(paths: Sequence[str], cfg: VisionConfig, cache: Path, batch_size: int = 64) -> np.ndarray:
    """(N, C) pooled backbone features of each photo (zeros for an unreadable one), cached in ``cache``."""
    import timm

    from pv2tea.models.vision import create_backbone, data_config, load_backbone_weights, timm_api

    key = _key(paths)
    if cache.is_file():
        try:
            with np.load(cache) as saved:
                if str(saved["key"]) == key:
                    return np.asarray(saved["features"])
        except (OSError, ValueError, KeyError):
            pass  # damaged or of other photos: computed again
    backbone = create_backbone(cfg)
    load_backbone_weights(backbone, cfg.weights, cfg.name)
    backbone.eval()
    transform = timm.data.create_transform(**data_config(backbone, cfg))
    api = timm_api(backbone)
    levels = list(cfg.extra_levels)
    out: list[np.ndarray] = []
    for start in range(0, len(paths), batch_size):
        batch = []
        for path in paths[start : start + batch_size]:
            try:
                batch.append(transform(load_rgb(path)))
            except Exception:  # noqa: BLE001 - an unreadable photo is a row without image evidence
                batch.append(None)
        ok = [t for t in batch if t is not None]
        if not ok:
            out.append(np.zeros((len(batch), out[0].shape[1] if out else 1), dtype=np.float32))
            continue
        x = torch.stack(ok)
        if levels:
            final, inter = api.forward_intermediates(x, indices=levels)
            maps = [final, *inter]
        else:
            maps = [api.forward_features(x)]
        pooled = torch.cat([m.mean(dim=(2, 3)) for m in maps], dim=1).numpy()  # (B, C): each map averaged over h, w
        full = np.zeros((len(batch), pooled.shape[1]), dtype=np.float32)
        full[[i for i, t in enumerate(batch) if t is not None]] = pooled
        out.append(full)
    features = np.concatenate(out)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, key=key, features=features)
    return features


def _fit_predict(x_train: np.ndarray, y_train: Sequence[str], x_test: np.ndarray) -> list[str]:
    classes = sorted(set(y_train))
    if len(classes) == 1:
        return [classes[0]] * len(x_test)
    scaler = StandardScaler().fit(x_train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = LogisticRegression(C=PROBE_C, max_iter=300).fit(scaler.transform(x_train), list(y_train))
    return [str(c) for c in model.predict(scaler.transform(x_test))]


def probe_answers(
    train: Sequence[Record],
    test: Sequence[Record],
    features: dict[str, np.ndarray],
) -> dict[str, list[list[str]]]:
    """{"probe_weak": answers, "probe_gold": answers} for ``test``, per attribute fitted on ``train`` (its first
    label value / gold value; rows without a photo feature are left out of the fit and answered by the majority)."""
    answers: dict[str, list[list[str]]] = {name: [[] for _ in test] for name in PROBE_ROWS}
    for attribute in sorted({r.attribute for r in test}):
        rows = [i for i, r in enumerate(test) if r.attribute == attribute]
        fit = [r for r in train if r.attribute == attribute and r.images and r.images[0] in features]
        for name, target in (("probe_weak", "label"), ("probe_gold", "gold")):
            labelled = [(r, getattr(r, target)) for r in fit if getattr(r, target)]
            if not labelled:
                continue
            y = [values[0] for _, values in labelled]
            x = np.stack([features[r.images[0]] for r, _ in labelled])
            majority = max(set(y), key=y.count)
            seen = [i for i in rows if test[i].images and test[i].images[0] in features]
            if seen:
                x_test = np.stack([features[test[i].images[0]] for i in seen])
                for i, answer in zip(seen, _fit_predict(x, y, x_test)):
                    answers[name][i] = [answer]
            for i in set(rows) - set(seen):
                answers[name][i] = [majority]
    return answers
