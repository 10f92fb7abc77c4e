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

With ``attack`` (``--attack``) a third server (micro-batching on, ``--request-timeout attack_timeout``, header and
body timeouts of ``attack_client_timeout``) is driven by the same ``clients`` with valid requests only, first alone
and then beside a hostile mix sent at ``attack_rate`` requests per second (the cases: an image past the
aspect-ratio limit and one at it, a 10 MB string, lone surrogates, 100,000-deep nesting, a 100,000-digit number,
invalid UTF-8, a client that stops mid-headers and one that stops mid-body, and 64 copies of a 6000 × 6000 PNG that
cannot be decoded within the timeout); then, alone, the last case is sent ``attack_probes`` times and the server's
CPU time is watched after each 504. ``serve["attack"]`` holds:

- ``server_errors``: 5xx other than 503/504 and dropped connections, valid and hostile requests together;
- ``rows_per_s_ratio``: valid rows per second beside the attack over those without it;
- ``peak_rss_ratio``: the server's peak resident memory (sampled every 50 ms) over its memory when idle after a
  warm-up;
- ``max_overrun_s``: the longest time the server kept working (above 10 % of a core) after answering a probe 504;
- ``p50_ms`` / ``p99_ms``: latency of the valid requests answered 200 beside the attack.
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
import threading
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
    attack: bool = False  # also measure valid traffic beside a hostile mix (a third server)
    attack_rate: float = 2.0  # hostile requests started per second, whatever becomes of the earlier ones
    attack_timeout: float = 5.0  # the attacked server's --request-timeout
    attack_client_timeout: float = 2.0  # the attacked server's --header-timeout and --body-timeout
    attack_probes: int = 2  # undecodable-in-time requests sent alone to measure the work past their 504

    def __post_init__(self) -> None:
        if self.clients < 1 or self.seconds <= 0 or self.baseline_seconds <= 0 or self.max_requests < 1:
            raise ValueError("--clients, --seconds and the request budget must be positive")
        if self.attack_rate <= 0 or self.attack_timeout <= 0 or self.attack_client_timeout <= 0:
            raise ValueError("--attack-rate and the attacked server's timeouts must be positive")
        if self.attack_probes < 1:
            raise ValueError("the attack needs at least one probe")
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

    def cpu_seconds(self) -> float:
        """CPU time the server has used, all threads (0 where /proc is unavailable)."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, in clock ticks

    def wait_idle(self, timeout: float = 60.0, window: float = 0.2, busy: float = 0.1) -> float:
        """Wait until the server uses less than ``busy`` of a core over ``window`` seconds; returns when that quiet
        window began (``time.monotonic()``), or the time given up at after ``timeout`` seconds."""
        start = time.monotonic()
        samples = [(start, self.cpu_seconds())]
        while (now := time.monotonic()) < start + timeout:
            time.sleep(0.05)
            now, cpu = time.monotonic(), self.cpu_seconds()
            samples.append((now, cpu))
            before = [(t, c) for t, c in samples if now - t >= window]
            if before and cpu - before[-1][1] <= busy * (now - before[-1][0]):
                return before[-1][0]
        return now

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
class _Attack:
    kind: str
    content: bytes = b""  # the request body
    slow: str | None = None  # "headers" / "body": a client that stops sending there instead


def _png(width: int, height: int, mode: str = "RGB") -> str:
    """A plain PNG of ``width`` × ``height``, base64 (a few hundred bytes to a few KB: one colour compresses)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, (width, height), 1 if mode == "1" else (90, 120, 150)).save(buffer, "PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode()


BIG_IMAGE_SIDE = 6000  # the PNG whose decoding outlasts the attacked server's timeout (64 copies in one request)


def _distinct_copies(png: str, n: int) -> list[str]:
    """``n`` copies of the base64 PNG ``png`` that differ in a text chunk only (the server decodes identical
    images of a request once)."""
    import struct
    import zlib

    raw = base64.b64decode(png)
    end = raw[-12:]  # the IEND chunk
    copies = []
    for k in range(n):
        text = b"Comment\x00copy %d" % k
        chunk = struct.pack(">I", len(text)) + b"tEXt" + text + struct.pack(">I", zlib.crc32(b"tEXt" + text))
        copies.append(base64.b64encode(raw[:-12] + chunk + end).decode())
    return copies


def _attacks(products: list[dict]) -> list[_Attack]:
    """One request of each hostile kind, serialized once."""
    product = {k: v for k, v in products[0].items() if k != "images"}

    def body(*rows: dict) -> bytes:
        return json.dumps({"products": list(rows)}).encode()  # ensure_ascii: a lone surrogate is sent as \ud800

    big = _distinct_copies(_png(BIG_IMAGE_SIDE, BIG_IMAGE_SIDE, "1"), 64)
    valid_json = body({**product, "text": "plain text", "images": []})
    return [
        _Attack("elongated", body({**product, "images": [_png(20_000, 1)]})),  # past --max-aspect-ratio: 422
        _Attack("aspect_at_limit", body({**product, "images": [_png(4_000, 200)]})),  # 20:1, decoded: 200
        _Attack("huge_string", body({**product, "category": "c" * 10_000_000})),  # over --max-field-chars: 422
        _Attack("lone_surrogate", body({**product, "id": "\udfff", "text": "mug \ud800 red"})),  # 422
        _Attack("deep_nesting", b'{"products": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),  # 422
        _Attack("long_number", b'{"products": [{"id": ' + b"9" * 100_000 + b"}]}"),  # 422
        _Attack("invalid_utf8", valid_json.replace(b"plain text", b"plain \xff\xfe text")),  # 422
        _Attack("slow_headers", slow="headers"),  # 408 after --header-timeout, closed
        _Attack("slow_body", slow="body"),  # 408 after --body-timeout, closed
        _Attack(  # decoding outlasts --request-timeout: 504, and the decoding stops
            "big_images", body(*({**product, "id": f"big-{k}", "images": big[8 * k : 8 * k + 8]} for k in range(8)))
        ),
    ]


async def _slow_client(port: int, stop_in: str, timeout: float) -> str:
    """A client that stops sending mid-headers or mid-body: the server's answer ("408"), or "held" when the
    connection is still open after ``timeout`` seconds, "closed" when it was closed without an answer."""
    head = b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n"
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        return type(exc).__name__
    try:
        writer.write(head[:40] if stop_in == "headers" else head + b"\r\n" + b'{"products": [')
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(256), timeout)
    except asyncio.TimeoutError:
        return "held"
    except OSError:
        return "closed"
    finally:
        writer.close()
    return answer[9:12].decode(errors="replace") if answer.startswith(b"HTTP/1.1 ") else "closed"


async def _attacker(
    url: str, port: int, attacks: list[_Attack], rate: float, seconds: float, timeout: float
) -> dict[str, dict[str, int]]:
    """Start one of ``attacks`` (in turn) every 1/``rate`` seconds for ``seconds``, then wait for the last answers;
    returns each kind's answers by status."""
    outcomes: dict[str, dict[str, int]] = {}

    async def send(client: httpx.AsyncClient, attack: _Attack) -> None:
        if attack.slow is not None:
            status = await _slow_client(port, attack.slow, timeout)
        else:
            try:
                response = await client.post(
                    "/predict", content=attack.content, headers={"Content-Type": "application/json"}
                )
                status = str(response.status_code)
            except httpx.HTTPError as exc:
                status = type(exc).__name__
        counts = outcomes.setdefault(attack.kind, {})
        counts[status] = counts.get(status, 0) + 1

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=8)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(timeout)) as client:
        t0, tasks = time.perf_counter(), list[asyncio.Task]()
        while time.perf_counter() < t0 + seconds:
            tasks.append(asyncio.create_task(send(client, attacks[len(tasks) % len(attacks)])))
            await asyncio.sleep(max(0.0, t0 + len(tasks) / rate - time.perf_counter()))
        await asyncio.gather(*tasks)
    return outcomes


class _PeakRss:
    """The server's largest resident memory, sampled every 50 ms in a thread while the block runs."""

    def __init__(self, server: ServerProcess):
        self.server, self.peak = server, server.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.server.rss())

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.server.rss())


def _overrun(server: ServerProcess, body: bytes, timeout: float) -> tuple[str, float | None]:
    """Send ``body`` alone; after its 504, how long the server kept working (None when it was not answered 504)."""
    try:
        response = httpx.post(
            f"{server.url}/predict",
            content=body,
            headers={"Content-Type": "application/json"},
            timeout=timeout + 120,
        )
        status = str(response.status_code)
    except httpx.HTTPError as exc:
        return type(exc).__name__, None
    answered = time.monotonic()
    if status != "504":
        return status, None
    return status, max(0.0, server.wait_idle() - answered)


def _run_attack(
    cfg: ServeBenchConfig, products: list[dict], valid: list[_Body], common: list[str], log: Callable[[str], None]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The attack phases (see the module docstring): ``serve["attack"]`` and the details for the table."""
    attacks = _attacks(products)
    big = next(a for a in attacks if a.kind == "big_images")
    timeouts = [
        *("--request-timeout", str(cfg.attack_timeout)),
        *("--header-timeout", str(cfg.attack_client_timeout), "--body-timeout", str(cfg.attack_client_timeout)),
    ]
    log(f"attack: a third server, {cfg.clients} clients for {cfg.seconds:g} s without and with the hostile mix ...")
    server = ServerProcess(cfg.model, [*common, "--max-wait-ms", str(cfg.max_wait_ms), *timeouts])
    try:
        server.wait_ready(cfg.startup_timeout)
        asyncio.run(_drive(server.url, valid, cfg.clients, 1e9, cfg.clients * 2))  # warm-up
        server.wait_idle()
        idle_rss = server.rss()
        with _PeakRss(server) as peak:
            clean = asyncio.run(_drive(server.url, valid, cfg.clients, cfg.seconds, cfg.max_requests))

            async def beside() -> tuple[_Phase, dict[str, dict[str, int]]]:
                traffic = asyncio.create_task(_drive(server.url, valid, cfg.clients, cfg.seconds, cfg.max_requests))
                answers = await _attacker(
                    server.url,
                    server.port,
                    attacks,
                    cfg.attack_rate,
                    cfg.seconds,
                    max(cfg.attack_timeout, cfg.attack_client_timeout) + 30,
                )
                return await traffic, answers

            attacked, answers = asyncio.run(beside())
            server.wait_idle()
            log(f"attack: {cfg.attack_probes} request(s) of {big.kind} alone, the work after their 504 ...")
            probes = [_overrun(server, big.content, cfg.attack_timeout) for _ in range(cfg.attack_probes)]
        alive = httpx.get(f"{server.url}/health", timeout=30).status_code
    finally:
        exit_code = server.stop()
    hostile_errors = sum(
        n
        for kind, counts in answers.items()
        if kind not in ("slow_headers", "slow_body")
        for status, n in counts.items()
        if not status.isdigit() or (int(status) >= 500 and int(status) not in (503, 504))
    )
    clean_rate = clean.rows / clean.seconds
    overruns = [s for _, s in probes if s is not None]
    attack = {
        "server_errors": clean.server_errors + attacked.server_errors + hostile_errors,
        "rows_per_s_ratio": round(attacked.rows / attacked.seconds / clean_rate, 3) if clean_rate else None,
        "peak_rss_ratio": round(peak.peak / idle_rss, 3) if idle_rss else None,
        "max_overrun_s": round(max(overruns), 2) if overruns else None,
        "p50_ms": round(attacked.percentile(0.50), 1),
        "p99_ms": round(attacked.percentile(0.99), 1),
    }
    details = {
        "rate": cfg.attack_rate,
        "request_timeout": cfg.attack_timeout,
        "client_timeout": cfg.attack_client_timeout,
        "rows_per_s_without": round(clean_rate, 2),
        "rows_per_s_beside": round(attacked.rows / attacked.seconds, 2),
        "p50_ms_without": round(clean.percentile(0.50), 1),
        "p99_ms_without": round(clean.percentile(0.99), 1),
        "valid_status_counts": dict(sorted(attacked.status_counts.items())),
        "valid_status_counts_without": dict(sorted(clean.status_counts.items())),
        "hostile": {kind: dict(sorted(answers[kind].items())) for kind in sorted(answers)},
        "idle_rss_mb": round(idle_rss / 2**20, 1),
        "peak_rss_mb": round(peak.peak / 2**20, 1),
        "probes": [{"status": status, "overrun_s": None if s is None else round(s, 2)} for status, s in probes],
        "health_after": alive,
        "exit_code": exit_code,
    }
    return attack, details


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
        *("--max-batch", str(cfg.max_batch)),
        *(("--threads", str(cfg.threads)) if cfg.threads else ()),
        *("--precision", cfg.precision),
    ]
    small_bodies = ["--max-body-bytes", str(BODY_LIMIT)]  # not for the attack: its bodies must reach the checks
    log(f"starting two servers for {cfg.model} (micro-batching on and off)")
    batched = ServerProcess(cfg.model, [*common, *small_bodies, "--max-wait-ms", str(cfg.max_wait_ms)])
    alone = ServerProcess(cfg.model, [*common, *small_bodies, "--no-batching"])
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
    if cfg.attack:  # after the other two servers have stopped: alone on the machine's cores
        serve["attack"], attack_details = _run_attack(cfg, products, valid_bodies, common, log)
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
    if cfg.attack:
        details["attack"] = attack_details
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
    if "attack" in s:
        a, ad = s["attack"], d["attack"]
        lines += [
            "",
            f"| attack ({ad['rate']:g} hostile requests/s, --request-timeout {ad['request_timeout']:g}) | "
            "valid traffic beside it | valid traffic alone |",
            "| --- | --- | --- |",
            f"| rows/s | {ad['rows_per_s_beside']} (ratio {a['rows_per_s_ratio']}) | {ad['rows_per_s_without']} |",
            f"| p50 / p99 latency (ms) | {a['p50_ms']} / {a['p99_ms']} | {ad['p50_ms_without']} / {ad['p99_ms_without']} |",
            f"| valid status counts | {ad['valid_status_counts']} | {ad['valid_status_counts_without']} |",
            f"| server errors (5xx but 503/504, dropped) | {a['server_errors']} | |",
            f"| RSS idle → peak (MB) | {ad['idle_rss_mb']} → {ad['peak_rss_mb']} (ratio {a['peak_rss_ratio']}) | |",
            f"| work past a 504, alone (s) | {a['max_overrun_s']} (probes {ad['probes']}) | |",
            f"| /health after, exit code after SIGTERM | {ad['health_after']}, {ad['exit_code']} | |",
            *(f"| hostile: {kind} | {counts} | |" for kind, counts in ad["hostile"].items()),
        ]
    return "\n".join(lines)
