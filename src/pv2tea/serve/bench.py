"""``pv2tea bench serve``: the HTTP service under concurrent load, measured.

Two servers are started on loopback ports as subprocesses (``pv2tea serve``): one with micro-batching and one
without. A bounded asyncio client (httpx) drives the first with ``clients`` concurrent connections for
``seconds`` (or until the request budget is spent), mixing valid requests of 1–4 products with malformed and
oversized ones; then one client drives the second with valid requests only — the one-request-at-a-time
baseline. Both servers are stopped with SIGTERM and must exit 0. The figures:

- ``status_counts`` (every answer by status), ``server_errors`` (5xx other than the intended 503/504, and
  dropped connections), ``p50_ms`` / ``p99_ms`` (latency of the valid requests answered 200);
- ``rows_per_s`` (rows answered per second under load) against ``rows_per_s_one_at_a_time``, their ratio
  ``speedup``;
- ``rss_growth``: the loaded server's resident memory at the end over its memory after a warm-up, minus 1.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pv2tea.extras import missing_extra

try:
    import httpx
except ImportError as exc:
    raise missing_extra("bench serve", "serve", exc) from exc

__all__ = ["ServeBenchConfig", "ServerProcess", "run_serve_bench"]

BODY_LIMIT = 256 * 1024  # the benchmarked servers' --max-body-bytes: an oversized request is cheap to send


@dataclass
class ServeBenchConfig:
    model: Path  # a trained model folder (RUN/final)
    clients: int = 32  # concurrent connections of the loaded phase
    seconds: float = 60.0  # duration of the loaded phase
    baseline_seconds: float = 20.0  # duration of the one-client phase (micro-batching off)
    max_requests: int = 100_000  # request budget of the loaded phase
    data: Path | None = None  # a dataset file whose rows are sent (default: a synthetic catalog)
    max_batch: int = 32  # the batched server's --max-batch
    max_wait_ms: float = 5.0  # the batched server's --max-wait-ms
    threads: int | None = None  # torch threads of each server (--threads; None: torch's default, one per core)
    precision: str = "fp32"  # each server's --precision (fp32, bf16)
    invalid_share: float = 0.15  # share of malformed or oversized requests in the loaded phase
    seed: int = 0
    startup_timeout: float = 300.0  # seconds for a server to load the model and warm up

    def __post_init__(self) -> None:
        if self.clients < 1 or self.seconds <= 0 or self.baseline_seconds <= 0 or self.max_requests < 1:
            raise ValueError("--clients, --seconds and the request budget must be positive")
        if not (Path(self.model) / "pv2tea_config.json").is_file():
            raise FileNotFoundError(f"--model {self.model}: not a pv2tea model folder (no pv2tea_config.json)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``pv2tea serve`` in a subprocess on a free loopback port."""

    def __init__(self, model: Path, args: Sequence[str] = (), env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="pv2tea-serve-", suffix=".log", delete=False)
        command = [
            sys.executable,
            "-m",
            "pv2tea.cli",
            "serve",
            "--model",
            str(model),
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            *args,
        ]
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        )

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}: {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.process.kill()
        raise RuntimeError(f"the server was not ready within {timeout:g} s: {self.log_tail()}")

    def rss(self) -> int:
        """Resident memory in bytes (0 where /proc is unavailable)."""
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then the exit code (killed after ``timeout`` seconds: -9)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode

    def stop_mid_request(self, body: bytes, timeout: float = 60.0) -> dict[str, Any]:
        """SIGTERM while a request is in flight (its headers read, its body not yet sent).

        Returns the request's status line, whether new connections were refused meanwhile, and the exit code.
        """
        head = (
            f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(head)
            interim = sock.recv(1024)  # "100 Continue": the application is reading this request's body
            self.process.send_signal(signal.SIGTERM)
            refused, deadline = False, time.monotonic() + timeout
            while not refused and time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=5).close()
                    time.sleep(0.05)
                except OSError:
                    refused = True
            sock.sendall(body)
            response = b""
            try:
                while chunk := sock.recv(1 << 16):  # the server closes the connection after answering
                    response += chunk
            except OSError:  # timed out or reset: the status line below tells
                pass
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.log.close()
        return {
            "interim": interim.split(b"\r\n", 1)[0].decode(errors="replace"),
            "in_flight": response.split(b"\r\n", 1)[0].decode(errors="replace"),
            "new_connections_refused": refused,
            "exit_code": code,
        }

    def log_tail(self, chars: int = 2000) -> str:
        if not self.log.closed:
            self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-chars:]


def _products(cfg: ServeBenchConfig, folder: Path) -> list[dict[str, Any]]:
    """Request products (images inline) from ``cfg.data`` or a small synthetic catalog made in ``folder``."""
    if cfg.data is None:
        from pv2tea.data.synth import make_catalog

        data = make_catalog(folder / "catalog", n_products=40, seed=cfg.seed + 1, image_size=128)["train"]
    else:
        data = Path(cfg.data)
    from pv2tea.data.validate import load_dataset

    records = load_dataset(data, skip_invalid=True, require_label=False).records
    if not records:
        raise ValueError(f"{data}: no valid rows to send")
    return [
        {
            "id": r.id,
            "text": r.text,
            "category": r.category,
            "attribute": r.attribute,
            "images": [base64.b64encode(Path(p).read_bytes()).decode() for p in r.images[:1]],
        }
        for r in records[:200]
    ]


def _bad_png() -> str:
    """A ~100-byte PNG whose header claims 50,000 × 50,000 pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )
    return base64.b64encode(png).decode()


@dataclass
class _Body:
    kind: str  # valid | json | types | image | pixels | oversized
    content: bytes
    rows: int


def _bodies(products: list[dict], rng: random.Random, n: int, invalid_share: float) -> list[_Body]:
    """``n`` request bodies, serialized once: valid ones of 1–4 products, and the malformed or oversized share."""
    bad = {
        "json": lambda p: b'{"products": [{"id": ',
        "types": lambda p: json.dumps({"products": [{**p, "text": 12345, "images": {"a": 1}}]}).encode(),
        "image": lambda p: json.dumps({"products": [{**p, "images": ["@@not-base64@@"]}]}).encode(),
        "pixels": lambda p: json.dumps({"products": [{**p, "images": [_bad_png()]}]}).encode(),
        "oversized": lambda p: json.dumps({"products": [{**p, "text": "x" * (BODY_LIMIT + 1)}]}).encode(),
    }
    out = []
    for _ in range(n):
        if rng.random() < invalid_share:
            kind = rng.choice(sorted(bad))
            out.append(_Body(kind, bad[kind](rng.choice(products)), 0))
            continue
        chosen = rng.sample(products, min(rng.randint(1, 4), len(products)))
        request = {"products": [{**p, "id": f"{p['id']}#{k}"} for k, p in enumerate(chosen)]}
        out.append(_Body("valid", json.dumps(request).encode(), len(chosen)))
    return out


@dataclass
class _Phase:
    seconds: float = 0.0
    requests: int = 0
    rows: int = 0
    status_counts: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def server_errors(self) -> int:
        return sum(
            n for s, n in self.status_counts.items() if not s.isdigit() or (int(s) >= 500 and int(s) not in (503, 504))
        )


async def _drive(url: str, bodies: list[_Body], clients: int, seconds: float, budget: int) -> _Phase:
    """``clients`` concurrent senders for ``seconds`` or ``budget`` requests, whichever ends first."""
    phase = _Phase()
    sent = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(120.0)) as client:
        t0 = time.perf_counter()
        end = t0 + seconds

        async def sender() -> None:
            nonlocal sent
            while time.perf_counter() < end and sent < budget:
                body = bodies[sent % len(bodies)]
                sent += 1
                start = time.perf_counter()
                try:
                    response = await client.post("/predict", content=body.content, headers=headers)
                    status = str(response.status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                phase.status_counts[status] = phase.status_counts.get(status, 0) + 1
                phase.requests += 1
                if status == "200" and body.kind == "valid":
                    phase.rows += body.rows
                    phase.latencies_ms.append((time.perf_counter() - start) * 1000)

        await asyncio.gather(*(sender() for _ in range(clients)))
        phase.seconds = time.perf_counter() - t0
    return phase


def run_serve_bench(cfg: ServeBenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run both phases; returns ``{"serve": {...}}`` (the JSON line) plus ``"details"`` for the table."""
    rng = random.Random(cfg.seed)
    with tempfile.TemporaryDirectory(prefix="pv2tea-bench-serve-") as tmp:
        products = _products(cfg, Path(tmp))
    loaded_bodies = _bodies(products, rng, 512, cfg.invalid_share)
    valid_bodies = _bodies(products, rng, 128, 0.0)
    common = [
        *("--max-body-bytes", str(BODY_LIMIT), "--max-batch", str(cfg.max_batch)),
        *(("--threads", str(cfg.threads)) if cfg.threads else ()),
        *("--precision", cfg.precision),
    ]
    log(f"starting two servers for {cfg.model} (micro-batching on and off)")
    batched = ServerProcess(cfg.model, [*common, "--max-wait-ms", str(cfg.max_wait_ms)])
    alone = ServerProcess(cfg.model, [*common, "--no-batching"])
    try:
        batched.wait_ready(cfg.startup_timeout)
        alone.wait_ready(cfg.startup_timeout)
        warm = asyncio.run(_drive(batched.url, valid_bodies, cfg.clients, 1e9, cfg.clients * 2))
        if warm.status_counts.get("200", 0) == 0:
            raise RuntimeError(f"the warm-up requests failed: {warm.status_counts}; {batched.log_tail()}")
        rss_start = batched.rss()
        log(f"{cfg.clients} clients for {cfg.seconds:g} s (micro-batching on) ...")
        loaded = asyncio.run(_drive(batched.url, loaded_bodies, cfg.clients, cfg.seconds, cfg.max_requests))
        rss_end = batched.rss()
        log(f"1 client for {cfg.baseline_seconds:g} s (micro-batching off) ...")
        asyncio.run(_drive(alone.url, valid_bodies, 1, 1e9, 3))  # warm-up
        baseline = asyncio.run(_drive(alone.url, valid_bodies, 1, cfg.baseline_seconds, cfg.max_requests))
        sigterm = batched.stop_mid_request(valid_bodies[0].content)
    finally:
        exit_codes = {"batched": batched.stop(), "one_at_a_time": alone.stop()}
    rows_per_s = loaded.rows / loaded.seconds
    alone_rows_per_s = baseline.rows / baseline.seconds
    serve = {
        "clients": cfg.clients,
        "requests": loaded.requests,
        "status_counts": dict(sorted(loaded.status_counts.items())),
        "server_errors": loaded.server_errors + baseline.server_errors,
        "p50_ms": round(loaded.percentile(0.50), 1),
        "p99_ms": round(loaded.percentile(0.99), 1),
        "rows_per_s": round(rows_per_s, 2),
        "rows_per_s_one_at_a_time": round(alone_rows_per_s, 2),
        "speedup": round(rows_per_s / alone_rows_per_s, 2) if alone_rows_per_s else None,
        "rss_growth": round(rss_end / rss_start - 1, 4) if rss_start else None,
    }
    details = {
        "seconds": round(loaded.seconds, 1),
        "baseline_seconds": round(baseline.seconds, 1),
        "baseline_requests": baseline.requests,
        "baseline_p50_ms": round(baseline.percentile(0.5), 1),
        "rss_start_mb": round(rss_start / 2**20, 1),
        "rss_end_mb": round(rss_end / 2**20, 1),
        "exit_codes": exit_codes,
        "sigterm": sigterm,
    }
    return {"serve": serve, "details": details}


def format_table(result: dict[str, Any]) -> str:
    s, d = result["serve"], result["details"]
    lines = [
        "| measure | micro-batching, {} clients | one at a time, 1 client |".format(s["clients"]),
        "| --- | --- | --- |",
        f"| requests | {s['requests']} in {d['seconds']} s | {d['baseline_requests']} in {d['baseline_seconds']} s |",
        f"| rows/s | {s['rows_per_s']} | {s['rows_per_s_one_at_a_time']} |",
        f"| p50 / p99 latency (ms) | {s['p50_ms']} / {s['p99_ms']} | {d['baseline_p50_ms']} / – |",
        f"| status counts | {s['status_counts']} | |",
        f"| server errors (5xx but 503/504, dropped) | {s['server_errors']} | |",
        f"| speedup | {s['speedup']} | 1 |",
        f"| RSS after warm-up → end (MB) | {d['rss_start_mb']} → {d['rss_end_mb']} (growth {s['rss_growth']}) | |",
        f"| exit code after SIGTERM | {d['exit_codes']['batched']} | {d['exit_codes']['one_at_a_time']} |",
        f"| SIGTERM mid-request: the request in flight, new connections | {d['sigterm']['in_flight']}, "
        f"{'refused' if d['sigterm']['new_connections_refused'] else 'ACCEPTED'} | |",
    ]
    return "\n".join(lines)
