"""The service as a real process: `pv2tea bench serve` (short), SIGTERM finishing the request in flight."""

from __future__ import annotations

import json

from pv2tea.cli import main

KEYS = [
    "clients",
    "requests",
    "status_counts",
    "server_errors",
    "p50_ms",
    "p99_ms",
    "rows_per_s",
    "rows_per_s_one_at_a_time",
    "speedup",
    "rss_growth",
]


def test_bench_serve_short(tiny_trained, capsys):
    model, catalog = tiny_trained
    assert (
        main(
            [
                "bench",
                "serve",
                "--model",
                str(model),
                "--clients",
                "8",
                "--seconds",
                "2",
                "--data",
                str(catalog["train"]),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out.strip().splitlines()
    serve = json.loads(out[-1])["serve"]
    assert list(serve) == KEYS and serve["clients"] == 8
    counts = serve["status_counts"]
    assert counts.get("200", 0) > 0 and counts.get("422", 0) + counts.get("413", 0) > 0  # valid and hostile
    assert all(s in ("200", "413", "422") for s in counts), counts  # no 5xx, no dropped connection
    assert serve["server_errors"] == 0 and sum(counts.values()) == serve["requests"]
    assert serve["rows_per_s"] > 0 and serve["rows_per_s_one_at_a_time"] > 0 and serve["p99_ms"] >= serve["p50_ms"]
    # SIGTERM while a request is in flight: it is answered, new connections are refused, the server exits 0
    assert any(line.startswith("| exit code after SIGTERM | 0 | 0 |") for line in out)
    assert any(
        line.startswith("| SIGTERM mid-request: the request in flight, new connections | HTTP/1.1 200 OK, refused |")
        for line in out
    ), out
