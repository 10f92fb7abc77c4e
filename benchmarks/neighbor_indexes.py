"""Which approximate index S3's neighbour search uses: each faiss index kind of ``regularize.neighbors`` on the
same clustered synthetic rows (``pv2tea.bench.neighbors``), each in a fresh process: wall and CPU seconds of the
search (recall tuning included), peak RSS and recall@K against exact search on a sample of rows.

    python benchmarks/neighbor_indexes.py --rows 100000 --kinds ivfpq,ivf,hnsw
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


def one(kind: str, n: int, k: int, dim: int) -> dict[str, float]:
    from pv2tea.bench.neighbors import clustered_features
    from pv2tea.regularize.neighbors import approximate_knn, exact_knn_rows

    features, _ = clustered_features(n, dim)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    found = approximate_knn(features, k, index=kind)
    seconds, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    rows = np.sort(np.random.default_rng(7).choice(n, size=min(n, 500), replace=False))
    truth = exact_knn_rows(features, rows, k)
    recall = float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found[rows].tolist(), truth.tolist())]))
    return {
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2),
        "peak_gib": round(peak, 3),
        "recall": round(recall, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--kinds", default="ivfpq,ivf,hnsw")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.rows, args.k, args.dim)))
        return
    results = {}
    for kind in args.kinds.split(","):
        done = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                kind,
                "--rows",
                str(args.rows),
                "--k",
                str(args.k),
                "--dim",
                str(args.dim),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        results[kind] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{kind}: {results[kind]}", flush=True)
    print(json.dumps({"rows": args.rows, "indexes": results}))


if __name__ == "__main__":
    main()
