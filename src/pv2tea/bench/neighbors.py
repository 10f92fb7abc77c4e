"""``pv2tea bench neighbors``: how the cost of S3's weights grows with the number of rows of an attribute.

For each N, a fresh Python process (so that peak memory is its own) builds N synthetic rows with clustered
features (a Gaussian mixture: each component a random centre plus a random 32-dimensional subspace of
within-component variation plus isotropic noise, as product features cluster by product type) and weak labels,
predictions and categories that follow the components with noise. It then computes S3's weights as training does
for one attribute (regularize.neighbors: K visual neighbours and their label agreement against its chance level,
the prediction level against its chance level, combined and rescaled to mean 1), timed, and afterwards, not timed,
the recall@K of the neighbours against exact search on a sample of rows. The exponent is the least-squares slope
of log seconds on log N: 1 is linear growth.
"""

from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

SIZES = (10_000, 100_000, 1_000_000)


@dataclass(frozen=True)
class NeighborBenchConfig:
    sizes: tuple[int, ...] = SIZES
    k: int = 10  # neighbours per row (schemes.knn_k)
    dim: int = 256  # feature dimensions
    repeats: int = 2  # fresh processes per N; the fastest counts (the machine is shared)
    recall_sample: int = 1000  # rows whose neighbours are checked against exact search
    seed: int = 0


def clustered_features(
    n: int, dim: int = 256, clusters: int = 256, rank: int = 32, spread: float = 2.0, noise: float = 0.5, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(N, dim) float32 features drawn from a Gaussian mixture, and (N,) each row's component.

    Component c: a centre of norm about 1, plus ``spread`` times a random ``rank``-dimensional subspace of
    variation (so components overlap and a component's rows are not all each other's neighbours), plus isotropic
    noise of norm about ``noise``. Filled one component at a time: no temporary of the full size.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32) / np.float32(math.sqrt(dim))
    component = rng.integers(0, clusters, n)
    order = np.argsort(component, kind="stable")
    bounds = np.searchsorted(component[order], np.arange(clusters + 1))
    out = np.empty((n, dim), dtype=np.float32)
    for c in range(clusters):
        rows = order[bounds[c] : bounds[c + 1]]
        basis = rng.standard_normal((rank, dim), dtype=np.float32) * np.float32(spread / math.sqrt(rank * dim))
        x = rng.standard_normal((len(rows), rank), dtype=np.float32) @ basis  # (m, dim)
        x += centres[c]
        x += rng.standard_normal((len(rows), dim), dtype=np.float32) * np.float32(noise / math.sqrt(dim))
        out[rows] = x
    return out, component


def synthetic_labels(
    component: np.ndarray, values: int = 40, noise: float = 0.2, seed: int = 0
) -> tuple[list[frozenset[str]], list[frozenset[str]], list[str]]:
    """Weak labels, previous predictions and categories for rows of the given components.

    Each component has a true value (and a quarter of them a second one: multi-value labels); a row's label is its
    component's, or with probability ``noise`` a random value; its prediction the same with half the noise; its
    category is the component modulo 16. The value sets are shared objects, as a value index would hold them.
    """
    rng = np.random.default_rng(seed + 1)
    n, clusters = len(component), int(component.max()) + 1 if len(component) else 0
    names = [f"value{v}" for v in range(values)]
    singles = [frozenset({name}) for name in names]
    first = rng.integers(0, values, clusters)
    second = np.where(rng.random(clusters) < 0.25, rng.integers(0, values, clusters), first)
    true_sets = [frozenset({names[a], names[b]}) for a, b in zip(first, second)]

    def noisy(rate: float) -> list[frozenset[str]]:
        wrong = rng.random(n) < rate
        pick = rng.integers(0, values, n)
        return [singles[p] if w else true_sets[c] for c, w, p in zip(component.tolist(), wrong.tolist(), pick.tolist())]

    categories = [f"category{c % 16}" for c in range(16)]
    return noisy(noise), noisy(noise / 2), [categories[c % 16] for c in component.tolist()]


def s3_weights(
    features: np.ndarray,
    labels: Sequence[frozenset[str]],
    predictions: Sequence[frozenset[str]],
    categories: Sequence[str],
    k: int,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """S3's weights (N,) for one attribute as training computes them with the default schemes (overlap matching,
    soft chance correction, both levels, rescaled to mean 1), and the (N, k) visual neighbours."""
    from pv2tea.regularize.neighbors import (
        chance_corrected,
        combine,
        expected_agreement,
        expected_prediction_agreement,
        knn_indices,
        neighbour_agreement,
        prediction_reliability,
        rescale_to_mean_one,
    )

    neighbours = knn_indices(features, k, seed=seed)
    s_v = chance_corrected(
        neighbour_agreement(labels, neighbours, "overlap"), expected_agreement(labels, categories, "overlap"), "soft"
    )
    s_p = chance_corrected(
        prediction_reliability(labels, predictions, "overlap"),
        expected_prediction_agreement(labels, predictions, "overlap"),
        "soft",
    )
    return rescale_to_mean_one(combine(s_v, s_p)), neighbours


def measure(n: int, k: int = 10, dim: int = 256, recall_sample: int = 1000, seed: int = 0) -> dict[str, float]:
    """One N in this process: wall and CPU seconds of S3's weights, peak RSS (GiB, data included) and recall@k
    against exact search on ``recall_sample`` rows."""
    from pv2tea.regularize.neighbors import exact_knn_rows

    features, component = clustered_features(n, dim, seed=seed)
    labels, predictions, categories = synthetic_labels(component, seed=seed)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    weights, neighbours = s3_weights(features, labels, predictions, categories, k, seed)
    seconds, cpu_seconds = time.perf_counter() - wall0, time.process_time() - cpu0
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    if not np.all(np.isfinite(weights)):
        raise RuntimeError("non-finite S3 weights")
    rows = np.sort(np.random.default_rng(seed + 7).choice(n, size=min(n, recall_sample), replace=False))
    truth = exact_knn_rows(features, rows, k)
    found = neighbours[rows]
    recall = float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found.tolist(), truth.tolist())]))
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_gib": peak_gib, "recall": recall}


def measure_in_subprocess(n: int, cfg: NeighborBenchConfig) -> dict[str, float]:
    """:func:`measure` in a fresh Python process, so its peak memory is not the parent's or an earlier N's."""
    cmd = [
        sys.executable,
        "-m",
        "pv2tea.bench.neighbors",
        str(n),
        str(cfg.k),
        str(cfg.dim),
        str(cfg.recall_sample),
        str(cfg.seed),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench neighbors at N={n} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def growth_exponent(sizes: Sequence[int], seconds: Sequence[float]) -> float | None:
    """The least-squares slope of log seconds on log N (1: linear growth); None with fewer than two sizes."""
    if len(sizes) < 2:
        return None
    return float(np.polyfit(np.log(sizes), np.log(np.maximum(seconds, 1e-9)), 1)[0])


def run_neighbor_bench(cfg: NeighborBenchConfig, log: Callable[[str], None] = print) -> dict:
    """Every N of ``cfg.sizes`` in its own processes (the fastest of ``cfg.repeats``): the figures and the
    exponents of wall and CPU seconds, as ``{"neighbors": {"N": {"seconds", "cpu_seconds", "peak_gib", "recall"}},
    "exponent", "cpu_exponent"}``."""
    results: dict[str, dict[str, float]] = {}
    for n in cfg.sizes:
        runs = [measure_in_subprocess(n, cfg) for _ in range(cfg.repeats)]
        best = min(runs, key=lambda r: r["seconds"])
        results[str(n)] = {
            "seconds": round(best["seconds"], 3),
            "cpu_seconds": round(best["cpu_seconds"], 3),
            "peak_gib": round(max(r["peak_gib"] for r in runs), 3),
            "recall": round(best["recall"], 4),
        }
        log(f"N={n}: {results[str(n)]}")
    sizes = [int(n) for n in results]
    exponent = growth_exponent(sizes, [results[str(n)]["seconds"] for n in sizes])
    cpu_exponent = growth_exponent(sizes, [results[str(n)]["cpu_seconds"] for n in sizes])
    return {
        "neighbors": results,
        "exponent": None if exponent is None else round(exponent, 3),
        "cpu_exponent": None if cpu_exponent is None else round(cpu_exponent, 3),
    }


def format_table(result: dict) -> str:
    """The figures as a Markdown table."""
    lines = ["| N | seconds | CPU seconds | peak RSS (GiB) | recall@K |", "|---:|---:|---:|---:|---:|"]
    for n, r in result["neighbors"].items():
        lines.append(
            f"| {int(n):,} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['peak_gib']:.2f} | {r['recall']:.3f} |"
        )
    if result["exponent"] is not None:
        lines.append(
            f"\nfitted growth exponent (log seconds on log N): {result['exponent']:.2f} wall, "
            f"{result['cpu_exponent']:.2f} CPU"
        )
    else:
        lines.append("\n(one size: no growth exponent)")
    return "\n".join(lines)


if __name__ == "__main__":  # one N, as measure_in_subprocess runs it: N k dim recall_sample seed
    n_, k_, dim_, sample_, seed_ = (int(v) for v in sys.argv[1:6])
    print(json.dumps(measure(n_, k_, dim_, sample_, seed_)))
