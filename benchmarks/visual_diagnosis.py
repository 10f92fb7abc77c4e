"""What the frozen image features know, and whether S3 can tell a right weak label from a wrong one.

    python benchmarks/visual_diagnosis.py --train CATALOG/train.jsonl --test CATALOG/test.jsonl [--k 10]

Needs gold values on both files (the synthetic catalog has them). Encodes every first image once with the
`cpu` preset's frozen backbone and image size, then prints, per attribute:

1. Linear probe on *gold* values (one-vs-rest logistic regression on standardized, mean-pooled features)
   from three depths of the backbone: two intermediate stages and the final feature map that the model
   uses (timm's ``forward_intermediates``). Exact-set accuracy and macro F1 over values on the test file. It bounds what the image side
   can contribute once the model has learned to read it.
2. S3's visual reliability s_v (Eq. 12, K nearest neighbours of the final pooled features) on the training
   file, averaged over rows whose weak label is right vs wrong, raw and chance-corrected both ways
   (`schemes.nr_chance=soft|clip`), and the cross-fitted probe's (`schemes.nr_visual=probe`) on stage-2 and final
   features, with the AUC of each for "the weak label is right". A useful weight is higher for right labels.
3. The same probe trained on the *weak* labels (all training rows, and only the rows whose text states the label),
   scored against gold: what the image side can learn from the labels PV2TEA trains on.
4. How often the weak label is right where the text states it (grounded: what mention dropout trains the image
   side on) and where it does not (the extractor guessed), on the training file.

Only diagnostics: nothing is trained except the probes; results are printed, not saved.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from sklearn.multiclass import OneVsRestClassifier  # noqa: E402
from sklearn.preprocessing import MultiLabelBinarizer, StandardScaler  # noqa: E402

from pv2tea.config import load_config  # noqa: E402
from pv2tea.data.images import load_rgb  # noqa: E402
from pv2tea.data.validate import load_dataset  # noqa: E402
from pv2tea.eval.normalize import normalize_values  # noqa: E402
from pv2tea.models.vision import create_backbone, data_config, load_backbone_weights  # noqa: E402
from pv2tea.regularize.grounding import label_in_text  # noqa: E402
from pv2tea.regularize.neighbors import chance_corrected, expected_agreement, visual_reliability  # noqa: E402
from pv2tea.regularize.probe import probe_reliability  # noqa: E402


@torch.no_grad()
def pooled_features(backbone, transform, paths: list[str], batch_size: int = 64) -> dict[str, np.ndarray]:
    """Mean-pooled features of each image: two intermediate stages (timm's ``forward_intermediates``; for
    EfficientNet-Lite0 stride 16 and 32 before the last 1×1 conv) and the final map the model uses."""
    out: dict[str, list[np.ndarray]] = {"stage 2": [], "stage 3": [], "final": []}
    for start in range(0, len(paths), batch_size):
        x = torch.stack([transform(load_rgb(p)) for p in paths[start : start + batch_size]])  # (B, 3, S, S)
        final, stages = backbone.forward_intermediates(x, indices=[2, 3])  # (B, C, h, w), [(B, C_i, h_i, w_i)]
        out["stage 2"].append(stages[0].mean((2, 3)).numpy())
        out["stage 3"].append(stages[1].mean((2, 3)).numpy())
        out["final"].append(final.mean((2, 3)).numpy())  # (B, C)
    return {name: np.concatenate(parts) for name, parts in out.items()}


def probe_probabilities(
    train_x: np.ndarray, train_y: list[list[str]], test_x: np.ndarray
) -> tuple[list[str], np.ndarray]:
    """A one-vs-rest logistic probe on standardized features: its values and each test row's probabilities (N, V)."""
    binarizer = MultiLabelBinarizer().fit(train_y)
    scaler = StandardScaler().fit(train_x)
    classes = list(binarizer.classes_)
    if len(classes) == 1:  # one value in training: the probe is that value (sklearn's binary case has 2 columns)
        return classes, np.ones((len(test_x), 1))
    clf = OneVsRestClassifier(LogisticRegression(C=0.5, max_iter=2000)).fit(
        scaler.transform(train_x), binarizer.transform(train_y)
    )
    return classes, clf.predict_proba(scaler.transform(test_x))  # (N, V)


def probe(
    train_x: np.ndarray, train_y: list[list[str]], test_x: np.ndarray, test_y: list[list[str]], return_top: bool = False
) -> tuple:
    """(exact-set accuracy, macro F1 over values) of a one-vs-rest logistic probe; at least the top value.
    With ``return_top`` also each test row's most probable value."""
    classes, prob = probe_probabilities(train_x, train_y, test_x)  # (N, V) over the training values
    binarizer = MultiLabelBinarizer(classes=sorted(set(classes) | {v for vs in test_y for v in vs}))
    y_test = binarizer.fit_transform(test_y).astype(bool)
    pred = np.zeros_like(y_test)
    column = {c: j for j, c in enumerate(binarizer.classes_)}
    cols = [column[c] for c in classes]
    pred[:, cols] = prob > 0.5
    pred[np.arange(len(prob)), [cols[j] for j in prob.argmax(1)]] = True
    exact = float((pred == y_test).all(1).mean())
    tp = (pred & y_test).sum(0)
    f1 = 2 * tp / np.maximum(2 * tp + (pred & ~y_test).sum(0) + (~pred & y_test).sum(0), 1)
    if return_top:
        return exact, float(f1[y_test.any(0)].mean()), [classes[j] for j in prob.argmax(1)]
    return exact, float(f1[y_test.any(0)].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--config", default="cpu")
    args = parser.parse_args()
    t0 = time.perf_counter()
    cfg = load_config(args.config)
    backbone = create_backbone(cfg.vision)
    load_backbone_weights(backbone, cfg.vision.weights, cfg.vision.name)
    backbone.eval()
    transform = timm.data.create_transform(**data_config(backbone, cfg.vision))
    train = [r for r in load_dataset(args.train).records if r.images and r.gold]
    test = [r for r in load_dataset(args.test).records if r.images and r.gold]
    paths = sorted({r.images[0] for r in train + test})
    feats = pooled_features(backbone, transform, paths)
    row_of = {p: i for i, p in enumerate(paths)}
    print(
        f"{cfg.vision.name} at {cfg.vision.image_size or 'native'} px, {len(paths)} images "
        f"({time.perf_counter() - t0:.0f} s to encode)"
    )
    for attribute in sorted({r.attribute for r in train}):
        tr = [r for r in train if r.attribute == attribute]
        te = [r for r in test if r.attribute == attribute]
        print(f"\n{attribute}: {len(tr)} train / {len(te)} test rows")
        for depth, x in feats.items():
            exact, f1 = probe(
                x[[row_of[r.images[0]] for r in tr]],
                [list(r.gold) for r in tr],
                x[[row_of[r.images[0]] for r in te]],
                [list(r.gold) for r in te],
            )
            print(
                f"  linear probe on gold, {depth:>7} features ({x.shape[1]:>4}-d): "
                f"exact-set accuracy {100 * exact:5.1f}, macro F1 {100 * f1:5.1f}"
            )
        labels = [normalize_values(r.label) for r in tr]
        right = np.array([labels[i] == normalize_values(r.gold) for i, r in enumerate(tr)])
        grounded = np.array([label_in_text(r.label, r.text) for r in tr])
        for depth in ("stage 2", "final"):  # what the image side can learn from the weak labels themselves
            x = feats[depth]
            for name, rows in (("all rows", np.ones(len(tr), bool)), ("grounded rows", grounded)):
                exact, f1 = probe(
                    x[[row_of[r.images[0]] for r, keep in zip(tr, rows) if keep]],
                    [list(r.label) for r, keep in zip(tr, rows) if keep],
                    x[[row_of[r.images[0]] for r in te]],
                    [list(r.gold) for r in te],
                )
                print(
                    f"  linear probe on weak labels, {name:>13}, {depth:>7} features: "
                    f"exact-set accuracy {100 * exact:5.1f}, macro F1 {100 * f1:5.1f}"
                )
        s_v = visual_reliability(feats["final"][[row_of[r.images[0]] for r in tr]], labels, args.k, "overlap")
        expected = expected_agreement(labels, [r.category for r in tr], "overlap")
        scores = [
            ("raw s_v", s_v),
            ("soft (1 + κ)/2", chance_corrected(s_v, expected, "soft")),
            ("clip κ to [0, 1]", chance_corrected(s_v, expected, "clip")),
        ]
        for depth in ("stage 2", "final"):  # schemes.nr_visual=probe; nr_features=levels reads stage 2
            p = probe_reliability(feats[depth][[row_of[r.images[0]] for r in tr]], labels)
            scores.append((f"probe {depth}, soft", chance_corrected(p, expected, "soft")))
        for name, s in scores:
            print(
                f"  S3 {name:>17}: right weak labels {s[right].mean():.3f}, wrong {s[~right].mean():.3f} "
                f"(ratio {s[right].mean() / max(s[~right].mean(), 1e-9):.2f}; AUC {roc_auc_score(right, s):.3f}; "
                f"{right.sum()} right, {(~right).sum()} wrong)"
            )
        for name, rows in (("grounded (label in text)", grounded), ("ungrounded", ~grounded)):
            print(
                f"  weak labels {name:>24}: {right[rows].sum():>3} right, {(~right[rows]).sum():>3} wrong "
                f"({100 * right[rows].mean() if rows.any() else 0:.0f}% right)"
            )


if __name__ == "__main__":
    main()
