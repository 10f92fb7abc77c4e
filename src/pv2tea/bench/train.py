"""``pv2tea bench train``: how fast the default model trains on cached features, and how close to the machine's peak.

Every figure comes from one run on a synthetic catalog (``pv2tea data synth``), with the ``cpu`` preset unless told
otherwise:

- samples/s of full optimizer steps (momentum update, forward, backward, gradient clipping, AdamW, queue) on the
  frozen backbones' features read from the on-disk cache (``pv2tea cache build``), and without the cache (the
  images decoded and both backbones run at every step): the cache's speed-up;
- the same cached steps with the rows in batches as they come and with each product's rows batched together
  (``train.product_batches``: a product's text and photo encoded once per batch), on the same rows and model: the
  speed-up of product batches (the synthetic catalogue has one row per attribute of a product);
- the FLOPs of one training step (forward and backward), counted by ``torch.utils.flop_counter.FlopCounterMode``
  (with CPU attention counted by its shapes), and the forward's per part (text encoder top layers, fusion,
  decoder, the rest); their rate against the float32 GEMM peak measured in the same process (a large
  ``torch.matmul`` loop): the model FLOPs utilization ``mfu``. Both rates are per CPU-second of this process (the
  steps' and the matmuls' ``time.process_time``), which other jobs on the machine do not inflate as they inflate
  wall time; ``mfu_wall`` is the same ratio per wall second;
- peak RSS of this process;
- 1 against 2 processes (``torchrun``, gloo, one thread each): samples/s and the scaling efficiency
  ``samples/s(2) / (2 x samples/s(1))``;
- peak RSS of training on cached features at 10K, 100K and 1M synthetic rows, each in a fresh process: random
  features of a small model written as a cache, the training loop's per-row state (records, pair ids, the epoch's
  order, the sample weights, the cache's key index) and a few steps. Memory must grow by per-row metadata only,
  never by the features (which stay on disk).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SIZES = (10_000, 100_000, 1_000_000)
PARTS = ("text_top", "fusion", "decoder", "other")


@dataclass(frozen=True)
class TrainBenchConfig:
    config: str = "cpu"
    overrides: tuple[str, ...] = ()
    products: int = 200  # synthetic products (one row per attribute) of the throughput runs
    image_size: int = 128  # pixels of the synthetic images
    steps: int = 20  # timed optimizer steps on cached features
    live_steps: int = 6  # timed steps encoding every step (slow)
    warmup: int = 3  # steps before timing
    # torch threads of the throughput and mfu runs. One by default: on a shared machine a waiting OpenMP thread
    # spins, so the CPU time of several threads grows with the other jobs, while one thread's does not
    threads: int | None = 1
    gemm_size: int = 2048  # n of the n x n float32 matmul of the peak
    gemm_seconds: float = 3.0
    processes: tuple[int, ...] = (1, 2)  # world sizes of the scaling runs (empty: skip)
    process_steps: int = 12
    memory_sizes: tuple[int, ...] = SIZES  # rows of the memory runs (empty: skip)
    memory_steps: int = 20
    seed: int = 0

    @classmethod
    def quick(cls, **kw: Any) -> TrainBenchConfig:
        base = {
            "products": 64,
            "steps": 8,
            "live_steps": 3,
            "warmup": 2,
            "gemm_seconds": 1.0,
            "process_steps": 5,
            "memory_steps": 5,
        }
        return cls(**{**base, **kw})


def peak_rss_gib() -> float:
    """This process's peak resident memory (GiB): VmHWM, which starts afresh with the program (``ru_maxrss`` keeps a
    forking parent's peak across exec); ``ru_maxrss`` where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ---------------------------------------------------------------------------------------------------- setup
def _quiet() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def synthetic_records(folder: Path, products: int, image_size: int, seed: int):
    """The training rows of a synthetic catalog written to ``folder``."""
    from pv2tea.data.synth import make_catalog
    from pv2tea.data.validate import load_dataset

    paths = make_catalog(folder, n_products=products, seed=seed, image_size=image_size)
    return load_dataset(paths["train"]).records


def load_cfg(config: str, overrides: Sequence[str]):
    from pv2tea.config import load_config

    return load_config(config, list(overrides))


def _step(model, optimizer, batch, grad_clip: float | None) -> float:
    """One optimizer step as training takes it; the loss."""
    import torch

    model.momentum_update()
    optimizer.zero_grad(set_to_none=True)
    out = model(batch)
    out.loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    model.enqueue(out)
    return float(out.loss.detach())


def step_seconds(model, pre, records, cfg, steps: int, warmup: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of each of ``steps`` optimizer steps (after ``warmup``), batches built as training
    builds them (a product's rows together with ``cfg.train.product_batches``, the model then encoding each distinct
    input of a batch once). CPU seconds (of all of this process's threads) are what the steps cost whatever else the
    machine runs; wall seconds include waiting for a core."""
    from pv2tea.data.dataset import RecordDataset, make_collate
    from pv2tea.train.loop import build_optimizer, epoch_batches

    dataset = RecordDataset(records)
    collate = make_collate(pre, dataset, with_answers=True)
    groups = dataset.pair_ids if cfg.train.product_batches else None
    model.cfg = cfg  # the model reads train.product_batches when it decides to share encodings
    optimizer, _ = build_optimizer(model, cfg, steps + warmup)
    batches: list[list[int]] = []
    epoch = 0
    while len(batches) < steps + warmup:
        batches += epoch_batches(len(records), cfg.train.batch_size, cfg.train.seed, epoch, groups)
        epoch += 1
    model.train()
    wall, cpu = [], []
    for indices in batches[: steps + warmup]:
        t, c = time.perf_counter(), time.process_time()
        _step(model, optimizer, collate(indices), cfg.optim.grad_clip)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return wall[warmup:], cpu[warmup:]


def _attention_formulas() -> dict:
    """FLOP formulas for the CPU flash-attention kernels (torch's counter knows only the GPU ones)."""
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten

    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out, query, key, value)

    return {
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
    }


def part_of(module_name: str, model) -> str | None:
    """The part a module (named as FlopCounterMode names it: ``PV2TEA.fusion.layers.0``) belongs to."""
    path = module_name.split(".")[1:]
    if not path:
        return None
    if path[0] == "text_encoder":
        layers = path[1:3] == ["encoder", "layer"] and len(path) > 3
        return "text_top" if layers and int(path[3]) >= model.text_frozen_layers else None
    if path[0] in ("fusion", "decoder"):
        return path[0]
    return None


def step_flops(model, pre, records, cfg) -> dict[str, int]:
    """FLOPs of one training step: ``total`` (forward and backward) and, per part (``PARTS``), the forward's.

    The parts are read from a forward pass alone: FlopCounterMode attributes a forward operation to the modules it
    runs in, but may attribute a backward one to several.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pv2tea.data.dataset import RecordDataset, make_collate

    collate = make_collate(pre, RecordDataset(records), with_answers=True)
    batch = collate(list(range(min(cfg.train.batch_size, len(records)))))
    model.train()
    counter = FlopCounterMode(display=False, custom_mapping=_attention_formulas())
    with counter:
        out = model(batch)
        out.loss.backward()
    model.zero_grad(set_to_none=True)
    total = int(counter.get_total_flops())
    forward = FlopCounterMode(display=False, custom_mapping=_attention_formulas())
    with forward, torch.no_grad():
        model(batch)
    counts = forward.get_flop_counts()
    out_parts = dict.fromkeys(PARTS, 0)
    # a module's count includes its submodules': attribute each part once, at its outermost module
    for name, ops in counts.items():
        part = part_of(name, model)
        parent = part_of(name.rsplit(".", 1)[0], model) if name.count(".") > 1 else None
        if part is not None and part != parent:
            out_parts[part] += int(sum(ops.values()))
    out_parts["other"] = int(forward.get_total_flops()) - sum(out_parts[p] for p in PARTS if p != "other")
    return {**out_parts, "forward": int(forward.get_total_flops()), "total": total, "rows": len(batch)}


def gemm_peak(n: int = 2048, seconds: float = 3.0) -> tuple[float, float]:
    """The float32 matmul rate of this process, per wall second and per CPU second (FLOP/s): the best of several
    timed rounds of an n x n product."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.matmul(a, b, out=out)  # warm up
    wall, cpu, deadline = 0.0, 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t, c = time.perf_counter(), time.process_time()
        for _ in range(3):
            torch.matmul(a, b, out=out)
        flops = 3 * 2 * n**3
        wall = max(wall, flops / (time.perf_counter() - t))
        cpu = max(cpu, flops / max(time.process_time() - c, 1e-9))
    return wall, cpu


# ---------------------------------------------------------------------------------------------- throughput
def measure_throughput(cfg_bench: TrainBenchConfig, work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Samples/s with and without the cache, FLOPs, the GEMM peak and mfu, in this process."""
    import torch

    from pv2tea.cache.build import ensure_cache, model_for_cache, run_cache_rows

    if cfg_bench.threads:
        torch.set_num_threads(cfg_bench.threads)
    records = synthetic_records(work / "catalog", cfg_bench.products, cfg_bench.image_size, cfg_bench.seed)
    cfg = load_cfg(cfg_bench.config, cfg_bench.overrides)
    model, pre = model_for_cache(cfg, records)
    images, texts = run_cache_rows(model, pre, records)
    t0 = time.perf_counter()
    pre.cache, counts = ensure_cache(
        work / "features", model, pre, images, texts, batch_size=cfg.train.eval_batch_size, workers=0
    )
    cache_seconds = time.perf_counter() - t0
    log(
        f"cache of {counts['images_encoded']} images and {counts['texts_encoded']} texts built in {cache_seconds:.1f} s"
    )
    cached_wall, cached_cpu = step_seconds(model, pre, records, cfg, cfg_bench.steps, cfg_bench.warmup)
    both = {}  # product batches off and on, the same rows and model (the first is the run above when it is off)
    for grouped in (False, True):
        if grouped == cfg.train.product_batches:
            both[grouped] = (cached_wall, cached_cpu)
        else:
            other = load_cfg(cfg_bench.config, [*cfg_bench.overrides, f"train.product_batches={str(grouped).lower()}"])
            both[grouped] = step_seconds(model, pre, records, other, cfg_bench.steps, cfg_bench.warmup)
    model.cfg = cfg
    flops = step_flops(model, pre, records, cfg)
    peak_wall, peak_cpu = gemm_peak(cfg_bench.gemm_size, cfg_bench.gemm_seconds)
    store, pre.cache = pre.cache, None
    live_wall, live_cpu = step_seconds(model, pre, records, cfg, cfg_bench.live_steps, 1)
    pre.cache = store
    batch = cfg.train.batch_size
    wall, cpu = statistics.median(cached_wall), statistics.median(cached_cpu)
    per_cpu_second = flops["total"] / cpu
    layers = flops["text_top"] + flops["fusion"] + flops["decoder"]
    return {
        "rows": len(records),
        "batch_size": batch,
        "threads": torch.get_num_threads(),
        "samples_per_s": batch / wall,
        "samples_per_cpu_s": batch / cpu,
        "samples_per_s_encoding": batch / statistics.median(live_wall),
        "cache_speedup": statistics.median(live_cpu) / cpu,
        "cache_speedup_wall": statistics.median(live_wall) / wall,
        "cache_build_s": cache_seconds,
        "product_batches": cfg.train.product_batches,
        "samples_per_s_product_batches": batch / statistics.median(both[True][0]),
        "product_batches_speedup": statistics.median(both[False][1]) / statistics.median(both[True][1]),
        "product_batches_speedup_wall": statistics.median(both[False][0]) / statistics.median(both[True][0]),
        "step_ms": 1000 * wall,
        "step_cpu_ms": 1000 * cpu,
        "flops_per_sample": flops["total"] / flops["rows"],
        "forward_flops_per_sample": {p: flops[p] / flops["rows"] for p in PARTS},
        "transformer_share": layers / max(flops["forward"], 1),
        "flops_per_s": flops["total"] / wall,
        "flops_per_cpu_s": per_cpu_second,
        "gemm_peak_flops_per_s": peak_wall,
        "gemm_peak_flops_per_cpu_s": peak_cpu,
        "mfu": per_cpu_second / peak_cpu,
        "mfu_wall": (flops["total"] / wall) / peak_wall,
        "peak_rss_gib": peak_rss_gib(),
    }


# ---------------------------------------------------------------------------------------------- processes
def ddp_worker(args: dict[str, Any]) -> None:
    """One rank of a scaling run (started by torchrun): time ``steps`` steps of ``batch_size`` rows per rank over the
    prepared cache; rank 0 prints ``{"samples_per_s", "world_size"}``."""
    import torch

    _quiet()
    torch.set_num_threads(args["threads"])
    from pv2tea.cache.build import model_for_cache, wanted_identity
    from pv2tea.cache.store import FeatureStore
    from pv2tea.data.dataset import RecordDataset, make_collate
    from pv2tea.data.validate import load_dataset
    from pv2tea.train import distributed as ddp
    from pv2tea.train.loop import build_optimizer, epoch_batches

    records = load_dataset(args["train"]).records
    cfg = load_cfg(args["config"], args["overrides"])
    accelerator = ddp.make_accelerator(cfg)
    world, rank = accelerator.num_processes, accelerator.process_index
    model, pre = model_for_cache(cfg, records)
    pre.cache = FeatureStore(args["cache"], wanted_identity(model, pre))
    net = ddp.prepare_model(accelerator, model)
    collate = make_collate(pre, RecordDataset(records), with_answers=True)
    steps, warmup = args["steps"], 2
    optimizer, _ = build_optimizer(model, cfg, steps + warmup)
    per_rank = cfg.train.batch_size
    order = [i for e in range(64) for b in epoch_batches(len(records), len(records), cfg.train.seed, e) for i in b]
    model.train()
    start = cpu = 0.0
    for step in range(steps + warmup):
        if step == warmup:
            accelerator.wait_for_everyone()
            start, cpu = time.perf_counter(), time.process_time()
        global_rows = order[step * per_rank * world : (step + 1) * per_rank * world]
        mine = ddp.rank_part(global_rows, world, rank)
        model.momentum_update()
        optimizer.zero_grad(set_to_none=True)
        out = net(collate(mine))
        accelerator.backward(out.loss)
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        model.enqueue(out)
    accelerator.wait_for_everyone()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    cpus = ddp.gather(cpu, accelerator)  # every rank's CPU seconds
    if rank == 0:
        samples = steps * per_rank * world
        print(
            json.dumps(
                {"samples_per_s": samples / elapsed, "samples_per_cpu_s": samples / sum(cpus), "world_size": world}
            )
        )


def measure_processes(cfg_bench: TrainBenchConfig, work: Path, log: Callable[[str], None]) -> dict[str, Any] | None:
    """samples/s of 1 and 2 processes (one thread each) over the cache ``measure_throughput`` built."""
    if not cfg_bench.processes:
        return None
    results: dict[str, float] = {}
    per_cpu: dict[str, float] = {}
    args = {
        "train": str(work / "catalog" / "train.jsonl"),
        "config": cfg_bench.config,
        "overrides": list(cfg_bench.overrides),
        "cache": str(work / "features"),
        "steps": cfg_bench.process_steps,
        "threads": 1,
    }
    for world in cfg_bench.processes:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={world}",
            "-m",
            "pv2tea.bench.train",
            "ddp",
            json.dumps(args),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"bench train with {world} process(es) failed:\n{done.stderr[-3000:]}")
        line = [x for x in done.stdout.strip().splitlines() if x.startswith("{")][-1]
        figures = json.loads(line)
        results[str(world)] = figures["samples_per_s"]
        per_cpu[str(world)] = figures["samples_per_cpu_s"]
        log(f"{world} process(es): {results[str(world)]:.1f} samples/s")
    out: dict[str, Any] = {"samples_per_s": results, "samples_per_cpu_s": per_cpu, "threads_per_process": 1}
    if "1" in results and "2" in results:
        out["scaling_efficiency"] = results["2"] / (2 * results["1"])
        out["scaling_efficiency_cpu"] = per_cpu["2"] / per_cpu["1"]  # the work DDP adds per sample
    return out


# -------------------------------------------------------------------------------------------------- memory
def memory_worker(n: int, steps: int, seed: int = 0) -> dict[str, Any]:
    """Peak RSS of training on a cache of N synthetic rows with random features, in this (fresh) process.

    A small model (a random 2-layer, 64-wide text encoder with the MiniLM vocabulary, a random test_efficientnet
    at 32 px, both frozen where the cpu preset freezes them) keeps the cache on disk at a few KiB per row; the rows'
    features are random, their image keys are digests of their (absent) image paths. The loop's per-row state is
    built as training builds it, then ``steps`` steps run on batches of the epoch's order."""
    import numpy as np
    import torch

    _quiet()
    torch.set_num_threads(1)
    from pv2tea.cache.build import model_for_cache, wanted_identity
    from pv2tea.cache.identity import content_digest, text_digest
    from pv2tea.cache.store import FeatureStore, ShardWriter, write_manifest
    from pv2tea.data.dataset import RecordDataset, make_collate
    from pv2tea.data.schema import Record
    from pv2tea.models.text import save_random_text_model
    from pv2tea.train.loop import build_optimizer, epoch_batches

    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="pv2tea-bench-memory-") as tmp:
        text_path = save_random_text_model(Path(tmp) / "text", hidden_size=64)
        cfg = load_cfg(
            "cpu",
            [
                "vision.name=test_efficientnet",
                "vision.weights=none",
                "vision.image_size=32",
                "vision.extra_levels=[]",
                f"text.path={text_path}",
                "text.max_tokens=16",
                "fusion.num_layers=1",
                "decoder.num_layers=1",
                "schemes.nr_features=backbone",
                "schemes.embed_dim=32",
                "train.batch_size=16",
            ],
        )
        words = ["red", "blue", "cotton", "steel", "mug", "shirt", "lamp", "large", "small", "round", "soft"]

        def row(i: int, a: int, b: int, c: int) -> Record:
            text = f"item {i} {words[a]} {words[b]} {words[c]}"
            return Record(f"p{i}", text, (f"/synthetic/{i}.jpg",), f"category{i % 16}", "color", (words[a],))

        model, pre = model_for_cache(cfg, [row(i, i % 11, 0, 0) for i in range(64)])
        base_rss = peak_rss_gib()  # libraries and model: what does not grow with N
        records = [row(i, a, b, c) for i, (a, b, c) in enumerate(rng.integers(0, len(words), (n, 3)).tolist())]
        folder = Path(tmp) / "features"
        folder.mkdir()
        digests = {r.images[0]: content_digest(r.images[0].encode()) for r in records}
        model.eval()
        with torch.no_grad():
            shape = model.visual.cached_tokens(torch.zeros(1, 3, 32, 32)).shape[1:]  # (N, C)
        hidden = model.bert_config.hidden_size
        images = ShardWriter(folder, "images", 0, 64 * 2**20, lambda: None)
        for r in records:
            images.add(digests[r.images[0]], rng.standard_normal(shape, dtype=np.float32))
        images.flush()
        texts = ShardWriter(folder, "texts", 0, 64 * 2**20, lambda: None)
        for start in range(0, n, 10_000):
            chunk = [pre.crop(r.text) for r in records[start : start + 10_000]]
            lengths = pre.tokenize_texts(chunk)["attention_mask"].sum(1).tolist()
            for t, length in zip(chunk, lengths):
                texts.add(text_digest(t), rng.standard_normal((length, hidden), dtype=np.float32))
        texts.flush()
        write_manifest(folder, wanted_identity(model, pre), images.written + texts.written)
        cache_bytes = sum(s["bytes"] for s in images.written + texts.written)
        del images, texts
        t0 = time.perf_counter()
        pre.cache = FeatureStore(folder, wanted_identity(model, pre), digests)
        dataset = RecordDataset(records)
        collate = make_collate(pre, dataset, with_answers=True)
        weights = np.ones(n)  # S3's weights of the epoch
        order = [i for b in epoch_batches(n, cfg.train.batch_size, cfg.train.seed, 0) for i in b]
        optimizer, _ = build_optimizer(model, cfg, steps)
        model.train()
        for step in range(steps):
            indices = order[step * cfg.train.batch_size : (step + 1) * cfg.train.batch_size]
            batch = collate(indices)
            w = torch.as_tensor(weights[indices], dtype=torch.float32)
            model.momentum_update()
            optimizer.zero_grad(set_to_none=True)
            out = model(batch, w)
            out.loss.backward()
            optimizer.step()
            model.enqueue(out)
        seconds = time.perf_counter() - t0
        return {
            "rows": n,
            "peak_gib": peak_rss_gib(),
            "base_gib": base_rss,
            "cache_gib_on_disk": cache_bytes / 2**30,
            "train_seconds": seconds,
        }


def measure_memory(cfg_bench: TrainBenchConfig, log: Callable[[str], None]) -> dict[str, Any] | None:
    """:func:`memory_worker` for each N in a fresh process; the growth of peak RSS per row between the sizes."""
    if not cfg_bench.memory_sizes:
        return None
    results: dict[str, dict[str, float]] = {}
    for n in cfg_bench.memory_sizes:
        cmd = [sys.executable, "-m", "pv2tea.bench.train", "memory", str(n), str(cfg_bench.memory_steps)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"bench train memory at N={n} failed:\n{done.stderr[-3000:]}")
        results[str(n)] = json.loads(done.stdout.strip().splitlines()[-1])
        log(f"memory at N={n}: {results[str(n)]['peak_gib']:.2f} GiB peak RSS")
    sizes = sorted(int(n) for n in results)
    out: dict[str, Any] = {"by_rows": results}
    if len(sizes) > 1:
        lo, hi = results[str(sizes[0])], results[str(sizes[-1])]
        out["bytes_per_row"] = (hi["peak_gib"] - lo["peak_gib"]) * 2**30 / (sizes[-1] - sizes[0])
        out["cache_bytes_per_row"] = hi["cache_gib_on_disk"] * 2**30 / sizes[-1]
    return out


# ------------------------------------------------------------------------------------------------------- run
def run_train_bench(cfg: TrainBenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every measurement of the module docstring: ``{"train": {...}}``."""
    _quiet()
    with tempfile.TemporaryDirectory(prefix="pv2tea-bench-train-") as tmp:
        work = Path(tmp)
        result = measure_throughput(cfg, work, log)
        log(
            f"{result['samples_per_s']:.1f} samples/s on cached features, mfu {result['mfu']:.3f} (CPU time), cache "
            f"speed-up {result['cache_speedup']:.1f}x"
        )
        result["processes"] = measure_processes(cfg, work, log)
    result["memory"] = measure_memory(cfg, log)
    result["settings"] = {k: v for k, v in asdict(cfg).items() if k not in ("memory_sizes",)}
    return {"train": result}


def format_table(result: dict[str, Any]):
    """The figures as a rich table."""
    from rich.table import Table

    r = result["train"]
    table = Table(title="pv2tea bench train", show_edge=False)
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        ("samples/s, cached features (wall)", f"{r['samples_per_s']:.1f}"),
        ("samples per CPU-second, cached features", f"{r['samples_per_cpu_s']:.1f}"),
        ("samples/s, encoding every step (wall)", f"{r['samples_per_s_encoding']:.1f}"),
        ("feature cache speed-up (CPU time; wall)", f"{r['cache_speedup']:.1f}x; {r['cache_speedup_wall']:.1f}x"),
        ("samples/s, cached features, product batches (wall)", f"{r['samples_per_s_product_batches']:.1f}"),
        (
            "product batches speed-up (CPU time; wall)",
            f"{r['product_batches_speedup']:.2f}x; {r['product_batches_speedup_wall']:.2f}x",
        ),
        (f"step, batch of {r['batch_size']} (wall; CPU)", f"{r['step_ms']:.0f} ms; {r['step_cpu_ms']:.0f} ms"),
        ("training GFLOPs per sample (forward + backward)", f"{r['flops_per_sample'] / 1e9:.2f}"),
        *(
            (f"  forward GFLOPs per sample: {part}", f"{r['forward_flops_per_sample'][part] / 1e9:.2f}")
            for part in PARTS
        ),
        (
            "GFLOP per CPU-second; fp32 GEMM peak",
            f"{r['flops_per_cpu_s'] / 1e9:.1f}; {r['gemm_peak_flops_per_cpu_s'] / 1e9:.1f}",
        ),
        ("mfu (CPU time)", f"{r['mfu']:.3f}"),
        ("mfu (wall clock)", f"{r['mfu_wall']:.3f}"),
        ("threads", str(r["threads"])),
        ("peak RSS", f"{r['peak_rss_gib']:.2f} GiB"),
    ]
    if r.get("processes"):
        p = r["processes"]
        for world, sps in p["samples_per_s"].items():
            rows.append((f"{world} process(es), 1 thread each", f"{sps:.1f} samples/s"))
        if "scaling_efficiency" in p:
            rows.append(
                (
                    "scaling efficiency 1 → 2 processes (wall; CPU time)",
                    f"{p['scaling_efficiency']:.2f}; {p['scaling_efficiency_cpu']:.2f}",
                )
            )
    if r.get("memory"):
        m = r["memory"]
        for n, row in m["by_rows"].items():
            rows.append(
                (
                    f"peak RSS training on {int(n):,} cached rows",
                    f"{row['peak_gib']:.2f} GiB ({row['peak_gib'] - row['base_gib']:+.2f} over libraries and model; "
                    f"cache {row['cache_gib_on_disk']:.2f} GiB on disk)",
                )
            )
        if "bytes_per_row" in m:
            rows.append(
                ("RSS growth per row", f"{m['bytes_per_row']:.0f} B (features {m['cache_bytes_per_row']:.0f} B)")
            )
    for name, value in rows:
        table.add_row(name, value)
    return table


if __name__ == "__main__":  # the subprocesses: "ddp JSON" under torchrun, "memory N STEPS"
    if sys.argv[1] == "ddp":
        ddp_worker(json.loads(sys.argv[2]))
    elif sys.argv[1] == "memory":
        print(json.dumps(memory_worker(int(sys.argv[2]), int(sys.argv[3]))))
