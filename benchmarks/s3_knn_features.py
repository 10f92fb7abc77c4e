"""Which visual features give S3 the neighbours that tell a right weak label from a wrong one.

    python benchmarks/s3_knn_features.py MODEL_DIR CATALOG/train.jsonl [--k 10]

MODEL_DIR is a trained run's final/ folder (its backbone and its S2 mask are used); the data file needs gold
values (the synthetic catalog has them). For each attribute and each candidate feature space
(`schemes.nr_features`), prints:

* the AUC of S3's visual weight (Eq. 12, value-set overlap, soft chance correction: as in training) for
  "weak label = gold": how well the weight ranks right labels above wrong ones;
* the mean weight of right and of wrong labels;
* how often a row's K neighbours share its *gold* value: how visual the neighbourhoods are.

Only a diagnostic: nothing is trained; results are printed.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from pv2tea.data.validate import load_dataset  # noqa: E402
from pv2tea.models.build import load_from_checkpoint  # noqa: E402
from pv2tea.regularize.neighbors import chance_corrected, expected_agreement, visual_reliability  # noqa: E402


@torch.no_grad()
def feature_spaces(model, pre, records) -> dict[str, torch.Tensor]:
    """(N, ·) features of each record's first image in every space S3 can use, plus level-2-only variants."""
    tokens = torch.cat(
        [
            model.visual.backbone_tokens(torch.stack([pre.image_tensor(r) for r in records[i : i + 64]]))
            for i in range(0, len(records), 64)
        ]
    )  # (N, P, C)
    final = model.visual.backbone.num_features  # channels of the final map; any further ones are earlier levels
    gate = torch.sigmoid(model.visual.head(tokens).mask_logits)[..., None]  # (N, P, 1)
    masked_mean = lambda t: (t * gate).sum(1) / gate.sum(1).clamp_min(1e-6)  # noqa: E731
    spaces = {
        "backbone": model.backbone_features(feats=tokens),
        "masked": model.masked_backbone_features(feats=tokens),
        "pooled": model.image_features(feats=tokens)[0],
    }
    if tokens.shape[-1] > final:
        spaces["backbone, level-2 channels"] = tokens[..., final:].mean(1)
        spaces["masked, level-2 channels"] = masked_mean(tokens[..., final:])
    return spaces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    model, pre = load_from_checkpoint(args.model)
    model.eval()
    if model.visual is None or model.visual.mask_head is None:
        raise SystemExit(f"{args.model}: needs a model with images and S2 attention pruning")
    records = [r for r in load_dataset(args.data).records if r.images and r.gold]
    firsts = sorted({r.images[0] for r in records})
    index = {p: i for i, p in enumerate(firsts)}
    by_image = {r.images[0]: r for r in records}
    spaces = feature_spaces(model, pre, [by_image[p] for p in firsts])
    for attribute in sorted({r.attribute for r in records}):
        rows = [r for r in records if r.attribute == attribute]
        idx = [index[r.images[0]] for r in rows]
        labels = [frozenset(v.lower() for v in r.label) for r in rows]
        golds = [frozenset(v.lower() for v in r.gold) for r in rows]
        right = np.array([a == b for a, b in zip(labels, golds)])
        chance = expected_agreement(labels, [r.category for r in rows], "overlap")
        print(f"{attribute}: {len(rows)} rows, weak label right for {right.mean():.0%}")
        for name, feats in spaces.items():
            x = feats[idx].numpy()
            weight = chance_corrected(visual_reliability(x, labels, args.k, "overlap"), chance, "soft")
            purity = visual_reliability(x, golds, args.k, "overlap").mean()
            auc = roc_auc_score(right, weight) if 0 < right.sum() < len(right) else float("nan")
            print(
                f"  {name:28s} AUC {auc:.3f}  weight right {weight[right].mean():.3f} "
                f"wrong {weight[~right].mean():.3f}  neighbours' gold agreement {purity:.3f}"
            )


if __name__ == "__main__":
    main()
