"""Training-step time with frozen backbones: cached features vs encoding every step.

    python benchmarks/train_step_speed.py [--steps 20] [--products 200]

Builds a synthetic catalog, then times full optimizer steps (forward, backward, AdamW, EMA,
queue) of the `cpu` preset with `vision.freeze=true text.freeze=true`, once without the feature cache (the frozen backbones
run every step) and once with it. Prints
the median step time of each and their ratio, measured in the same process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from pv2tea.config import load_config  # noqa: E402
from pv2tea.data.dataset import RecordDataset, make_collate  # noqa: E402
from pv2tea.data.synth import make_catalog  # noqa: E402
from pv2tea.data.validate import load_dataset  # noqa: E402
from pv2tea.models.build import build_for_training  # noqa: E402
from pv2tea.train.feature_cache import build_feature_cache  # noqa: E402
from pv2tea.train.loop import build_optimizer, epoch_batches  # noqa: E402


def step_times(records, cached: bool, steps: int) -> tuple[list[float], float]:
    torch.manual_seed(0)
    cfg = load_config("cpu", ["vision.freeze=true", "text.freeze=true"])
    model, pre = build_for_training(cfg, sorted({r.category for r in records}))
    t0 = time.perf_counter()
    if cached:
        pre.cache = build_feature_cache(model, pre, records, cfg.train.eval_batch_size)
    cache_seconds = time.perf_counter() - t0
    collate = make_collate(pre, RecordDataset(records), with_answers=True)
    optimizer, _ = build_optimizer(model, cfg, steps + 2)
    model.train()
    batches = epoch_batches(len(records), cfg.train.batch_size, 0, 0) * 4
    times = []
    for indices in batches[: steps + 2]:
        t = time.perf_counter()
        batch = collate(indices)
        model.momentum_update()
        out = model(batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        model.enqueue(out)
        times.append(time.perf_counter() - t)
    return times[2:], cache_seconds  # the first two steps warm up


def main() -> None:
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--products", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_catalog(Path(tmp) / "catalog", n_products=args.products, seed=0, image_size=128)
        records = load_dataset(paths["train"]).records
        live, _ = step_times(records, cached=False, steps=args.steps)
        cached, cache_seconds = step_times(records, cached=True, steps=args.steps)
    m_live, m_cached = statistics.median(live), statistics.median(cached)
    print(f"{len(records)} training rows, batch 16, {args.steps} steps each, {torch.get_num_threads()} threads")
    print(f"median step, backbones every step: {m_live * 1000:.0f} ms")
    print(f"median step, cached features:      {m_cached * 1000:.0f} ms (cache built once in {cache_seconds:.1f} s)")
    print(f"speed-up: {m_live / m_cached:.1f}x")


if __name__ == "__main__":
    main()
