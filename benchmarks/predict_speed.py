"""Inference speed of a trained model: batch prediction (rows/s) and HTTP latency of `pv2tea serve`.

    python benchmarks/predict_speed.py MODEL_DIR DATA.jsonl [--repeats 5] [--requests 20]

MODEL_DIR is a run's final/ folder (e.g. demo_out/run/final after `make demo`); DATA a JSONL file whose image
paths resolve (e.g. demo_out/catalog/test.jsonl). Prints, measured in one process:

* batch prediction through the chunked, flushed writer of `pv2tea predict` (rows/s, median of the repeats);
* the same rows through the HTTP app in-process (FastAPI TestClient, images sent inline as base64): the median
  latency of one-product requests and of 32-product requests.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from pv2tea.data.validate import load_dataset  # noqa: E402
from pv2tea.inference.batch import predict_to_file  # noqa: E402
from pv2tea.inference.predictor import Predictor  # noqa: E402
from pv2tea.serve.server import create_app  # noqa: E402


def _product(row: dict, folder: Path) -> dict:
    return {
        "id": row["id"],
        "text": row["text"],
        "category": row["category"],
        "attribute": row["attribute"],
        "images": [base64.b64encode((folder / p).read_bytes()).decode() for p in row.get("images", [])],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--requests", type=int, default=20)
    args = parser.parse_args()

    predictor = Predictor.from_checkpoint(args.model)
    records = load_dataset(args.data, require_label=False).records
    print(f"{len(records)} rows, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores")
    batch_times = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            t0 = time.perf_counter()
            predict_to_file(predictor, records, Path(tmp) / f"p{i}.jsonl", progress=False)
            batch_times.append(time.perf_counter() - t0)
    median = statistics.median(batch_times)
    print(
        f"batch predict: median {median:.2f} s for {len(records)} rows = {len(records) / median:.1f} rows/s "
        f"(runs: {', '.join(f'{t:.2f}' for t in batch_times)})"
    )

    raw = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    products = [_product(row, args.data.parent) for row in raw]
    client = TestClient(create_app(predictor))
    for size in (1, 32):
        latencies = []
        for i in range(args.requests):
            start = (i * size) % max(len(products) - size, 1)
            body = {"products": products[start : start + size]}
            t0 = time.perf_counter()
            response = client.post("/predict", json=body)
            latencies.append(time.perf_counter() - t0)
            response.raise_for_status()
        print(
            f"HTTP /predict, {size} product(s) per request: median {statistics.median(latencies) * 1000:.0f} ms "
            f"over {args.requests} requests"
        )


if __name__ == "__main__":
    main()
