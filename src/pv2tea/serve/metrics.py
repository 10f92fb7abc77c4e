"""Prometheus metrics of the HTTP service (prometheus-client), one registry per application."""

from __future__ import annotations

from dataclasses import dataclass

from pv2tea.extras import missing_extra

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
except ImportError as exc:
    raise missing_extra("serve", "serve", exc) from exc

__all__ = ["ServiceMetrics"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass
class ServiceMetrics:
    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    batch_rows: Histogram
    rows_predicted: Counter
    queue_depth: Gauge
    images_rejected: Counter
    decoded_bytes: Gauge

    @classmethod
    def create(cls) -> ServiceMetrics:
        registry = CollectorRegistry()
        return cls(
            registry=registry,
            requests=Counter(
                "pv2tea_requests",
                "HTTP requests answered, by route and status code.",
                ["route", "status"],
                registry=registry,
            ),
            latency=Histogram(
                "pv2tea_request_seconds",
                "Time from request to response, by route.",
                ["route"],
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
            batch_rows=Histogram(
                "pv2tea_batch_rows",
                "Rows in each model batch (micro-batching coalesces requests).",
                buckets=BATCH_BUCKETS,
                registry=registry,
            ),
            rows_predicted=Counter("pv2tea_rows_predicted", "Rows (product, attribute) predicted.", registry=registry),
            queue_depth=Gauge("pv2tea_queue_depth", "Requests waiting for the model.", registry=registry),
            images_rejected=Counter(
                "pv2tea_images_rejected",
                "Images refused, by reason (base64, bytes, path, format, pixels, aspect, corrupt, count).",
                ["reason"],
                registry=registry,
            ),
            decoded_bytes=Gauge(
                "pv2tea_decoded_image_bytes",
                "Bytes of decoded images held by the requests in flight (at most --max-decoded-bytes).",
                registry=registry,
            ),
        )

    def observe_batch(self, rows: int) -> None:
        self.batch_rows.observe(rows)
        self.rows_predicted.inc(rows)
