"""pv2tea bench train / extract on tiny random models: the JSON keys and sane values (not timings)."""

from __future__ import annotations

import json

from conftest import tiny_overrides
from pv2tea.bench.extract import ExtractBenchConfig, run_extract_bench
from pv2tea.bench.train import PARTS, TrainBenchConfig, format_table, run_train_bench

FROZEN = ("vision.freeze=true", "text.train_layers=1", "train.epochs=1")


def test_bench_train_reports_every_figure(tiny_text_ckpt, monkeypatch):
    import pv2tea.train.loop as loop

    grouped = []  # whether each epoch's batches were built by product

    def spy(n, batch_size, seed, epoch, groups=None):
        grouped.append(groups is not None)
        return real(n, batch_size, seed, epoch, groups)

    real = loop.epoch_batches
    monkeypatch.setattr(loop, "epoch_batches", spy)
    cfg = TrainBenchConfig(
        overrides=(*tiny_overrides(tiny_text_ckpt), *FROZEN),
        products=12,
        image_size=48,
        steps=2,
        live_steps=1,
        warmup=1,
        gemm_size=256,
        gemm_seconds=0.2,
        processes=(2,),
        process_steps=2,
        memory_sizes=(300, 600),
        memory_steps=2,
    )
    result = json.loads(json.dumps(run_train_bench(cfg, log=lambda m: None)))["train"]
    for key in ("samples_per_s", "samples_per_s_encoding", "cache_speedup", "flops_per_sample", "mfu", "peak_rss_gib"):
        assert result[key] > 0, key
    assert 0 < result["mfu"] < 2 and 0 < result["mfu_wall"] < 2  # a rate against a measured peak, not a timing
    # the cached steps ran both ways on the same rows: the rows as they come, and a product's rows together
    assert result["product_batches"] is False and True in grouped and False in grouped
    assert result["samples_per_s_product_batches"] > 0 and result["product_batches_speedup"] > 0
    assert set(result["forward_flops_per_sample"]) == set(PARTS)
    assert all(v >= 0 for v in result["forward_flops_per_sample"].values())
    assert result["forward_flops_per_sample"]["fusion"] > 0 and result["forward_flops_per_sample"]["decoder"] > 0
    assert result["flops_per_sample"] > sum(result["forward_flops_per_sample"].values())  # backward counted too
    assert result["processes"]["samples_per_s"]["2"] > 0
    memory = result["memory"]
    assert set(memory["by_rows"]) == {"300", "600"} and "bytes_per_row" in memory
    assert all(row["peak_gib"] > 0 and row["cache_gib_on_disk"] > 0 for row in memory["by_rows"].values())
    assert format_table({"train": result}).row_count > 10


def test_bench_extract_reports_both_rates(tiny_text_ckpt):
    cfg = ExtractBenchConfig(
        overrides=tuple(tiny_overrides(tiny_text_ckpt)), products=10, image_size=48, batch_size=4, repeats=1
    )
    result = json.loads(json.dumps(run_extract_bench(cfg, log=lambda m: None)))["extract"]
    assert result["products_per_s"] > 0 and result["bare_encoders_per_s"] > 0
    assert result["ratio"] > 0 and result["ratio_wall"] > 0
    assert result["rows"] >= 10 and result["mode"] == "generate"
