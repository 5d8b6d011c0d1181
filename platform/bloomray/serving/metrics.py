"""Prometheus metrics through Ray's metrics API (scraped from Ray's metrics endpoint)."""

from __future__ import annotations

import time

from ray.serve import metrics

_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]


class ServeMetrics:
    """Latency, time to first token, tokens/s, batch size, queue depth, errors by code."""

    def __init__(self) -> None:
        self.latency = metrics.Histogram(
            "bloomray_request_latency_ms", "request latency", boundaries=_MS, tag_keys=("route",)
        )
        self.ttft = metrics.Histogram(
            "bloomray_time_to_first_token_ms", "time to first streamed token", boundaries=_MS
        )
        self.tokens = metrics.Counter("bloomray_generated_tokens", "generated tokens")
        self.tok_s = metrics.Histogram(
            "bloomray_request_tokens_per_s",
            "generated tokens/s per request",
            boundaries=[1, 5, 10, 20, 50, 100, 200, 500, 1000, 5000],
        )
        self.batch = metrics.Histogram(
            "bloomray_batch_size", "requests per generation batch", boundaries=[1, 2, 4, 8, 16, 32, 64]
        )
        self.queue = metrics.Gauge("bloomray_queue_depth", "requests in flight on this replica")
        self.errors = metrics.Counter("bloomray_errors", "error responses", tag_keys=("code",))

    def done(self, route: str, start: float, tokens: int) -> None:
        elapsed = time.perf_counter() - start
        self.latency.observe(elapsed * 1000, tags={"route": route})
        if tokens:
            self.tokens.inc(tokens)
            self.tok_s.observe(tokens / max(elapsed, 1e-9))
