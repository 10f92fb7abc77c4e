"""``pv2tea bench extract``: end-to-end batch extraction against the bare encoders, in one run.

On a synthetic catalog whose images are written as JPEG files, two rates are measured in the same process:

- ``products_per_s``: rows (a product and an attribute) through what ``pv2tea predict`` does after reading its
  input: :func:`pv2tea.inference.batch.predict_to_file` with a model folder, i.e. JPEG decoding and resizing,
  tokenizing, both encoders, fusion and generation (or candidate ranking with ``candidates``), decoding the answers
  and writing the JSON Lines file;
- ``bare_encoders_per_s``: the same rows through the visual backbone and the text encoder alone, on images already
  decoded and transformed and texts already tokenized, in batches of the same size: the forward pass no
  extraction can avoid.

``ratio`` is their quotient per CPU-second of this process (``time.process_time``, which other jobs on a shared
machine do not inflate as they inflate wall time); ``ratio_wall`` per wall second. Each figure is the best of
``repeats`` rounds.
The model is the ``cpu`` preset's untrained (its answers are as long as ``decoder.max_answer_tokens`` allows,
the most generation can cost) unless a trained model folder is given.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ExtractBenchConfig:
    model: Path | None = None  # a trained model folder (RUN/final); None: the untrained cpu preset
    config: str = "cpu"
    overrides: tuple[str, ...] = ()
    products: int = 200  # synthetic products (each gives one row per attribute)
    image_size: int = 256  # pixels of the synthetic JPEG images
    batch_size: int = 32
    repeats: int = 2
    candidates: bool = False  # rank each row's candidate list instead of generating
    threads: int | None = 1  # torch threads; one: CPU time then measures the work (see bench/train.py)
    seed: int = 0

    @classmethod
    def quick(cls, **kw: Any) -> ExtractBenchConfig:
        return cls(**{"products": 48, "repeats": 1, **kw})


def jpeg_catalog(folder: Path, products: int, image_size: int, seed: int):
    """Every row of a synthetic catalog, its images re-encoded as JPEG files; and its candidate lists."""
    from PIL import Image

    from pv2tea.data.synth import make_catalog
    from pv2tea.data.validate import load_dataset

    paths = make_catalog(folder, n_products=products, seed=seed, image_size=image_size)
    records = [r for split in ("train", "val", "test") for r in load_dataset(paths[split]).records]
    converted: dict[str, str] = {}
    for r in records:
        for p in r.images:
            if p not in converted:
                target = str(Path(p).with_suffix(".jpg"))
                Image.open(p).convert("RGB").save(target, quality=90)
                converted[p] = target
    records = [replace(r, images=tuple(converted[p] for p in r.images)) for r in records]
    candidates: dict[str, list[str]] = {}
    for r in records:
        candidates.setdefault(r.attribute, [])
        candidates[r.attribute] = sorted({*candidates[r.attribute], *r.label})
    return records, candidates


def untrained_model(cfg, records, folder: Path) -> Path:
    """The model a run of ``cfg`` on ``records`` starts from, saved as a model folder."""
    from pv2tea.data.dataset import value_counts, value_vocabulary
    from pv2tea.models import checkpoint as ckpt
    from pv2tea.models.build import build_for_training, preprocess_state

    model, pre = build_for_training(
        cfg, sorted({r.category for r in records}), value_vocabulary(records), None, value_counts(records)
    )
    ckpt.save_checkpoint(folder, model, cfg, model.bert_config.to_dict(), preprocess_state(pre), pre.tokenizer)
    return folder


def end_to_end(predictor, records, out: Path, batch_size: int, candidates) -> tuple[float, float]:
    """Wall and CPU seconds of predict_to_file over the records."""
    from pv2tea.inference.batch import predict_to_file

    out.unlink(missing_ok=True)
    t, c = time.perf_counter(), time.process_time()
    predict_to_file(predictor, records, out, batch_size=batch_size, candidates=candidates, progress=False)
    return time.perf_counter() - t, time.process_time() - c


def bare_encoders(model, pre, records, batch_size: int) -> tuple[float, float]:
    """Wall and CPU seconds of the visual backbone and the text encoder over the rows, inputs prepared beforehand."""
    import torch

    batches = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        pixels = torch.stack([pre.image_tensor(r) for r in chunk if r.images])  # (b, 3, H, W)
        enc = pre.tokenize_texts([pre.crop(r.text) for r in chunk])
        batches.append((pixels, enc["input_ids"], enc["attention_mask"]))
    model.eval()
    t, c = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for pixels, ids, mask in batches:
            model.visual.backbone_tokens(pixels)
            model.text_encoder(input_ids=ids, attention_mask=mask)
    return time.perf_counter() - t, time.process_time() - c


def run_extract_bench(cfg: ExtractBenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """``{"extract": {"products_per_s", "bare_encoders_per_s", "ratio", ...}}``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from pv2tea.config import load_config
    from pv2tea.inference.predictor import Predictor

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    with tempfile.TemporaryDirectory(prefix="pv2tea-bench-extract-") as tmp:
        work = Path(tmp)
        records, candidates = jpeg_catalog(work / "catalog", cfg.products, cfg.image_size, cfg.seed)
        if not all(r.images for r in records):
            records = [r for r in records if r.images]  # the bare encoders take one image and one text per row
        folder = cfg.model
        if folder is None:
            torch.manual_seed(cfg.seed)
            folder = untrained_model(load_config(cfg.config, list(cfg.overrides)), records, work / "model")
        predictor = Predictor.from_checkpoint(folder)
        ranking = candidates if cfg.candidates else None
        log(f"{len(records)} rows, batch {cfg.batch_size}, {torch.get_num_threads()} threads, model {folder}")
        end_to_end(predictor, records[: cfg.batch_size], work / "warm.jsonl", cfg.batch_size, ranking)  # warm up
        e2e = [end_to_end(predictor, records, work / "out.jsonl", cfg.batch_size, ranking) for _ in range(cfg.repeats)]
        bare = [bare_encoders(predictor.model, predictor.pre, records, cfg.batch_size) for _ in range(cfg.repeats)]
    n = len(records)
    (e2e_wall, e2e_cpu), (bare_wall, bare_cpu) = (tuple(map(min, zip(*runs))) for runs in (e2e, bare))
    result = {
        "products_per_s": n / e2e_wall,
        "bare_encoders_per_s": n / bare_wall,
        "ratio": bare_cpu / e2e_cpu,
        "ratio_wall": bare_wall / e2e_wall,
        "products_per_cpu_s": n / e2e_cpu,
        "bare_encoders_per_cpu_s": n / bare_cpu,
        "rows": n,
        "batch_size": cfg.batch_size,
        "threads": torch.get_num_threads(),
        "mode": "candidates" if cfg.candidates else "generate",
        "model": "untrained cpu preset" if cfg.model is None else str(cfg.model),
    }
    return {"extract": result}


def format_table(result: dict[str, Any]):
    from rich.table import Table

    r = result["extract"]
    table = Table(
        title=f"pv2tea bench extract ({r['mode']}, {r['rows']} rows, batch {r['batch_size']})", show_edge=False
    )
    table.add_column("measure")
    table.add_column("rows/s", justify="right")
    table.add_column("rows per CPU-second", justify="right")
    table.add_row(
        "end to end (JPEG decode, tokenize, encode, fuse, decode, write)",
        f"{r['products_per_s']:.1f}",
        f"{r['products_per_cpu_s']:.1f}",
    )
    table.add_row(
        "bare encoders (backbone + text encoder forward)",
        f"{r['bare_encoders_per_s']:.1f}",
        f"{r['bare_encoders_per_cpu_s']:.1f}",
    )
    table.add_row("ratio", f"{r['ratio_wall']:.2f}", f"{r['ratio']:.2f}")
    return table
