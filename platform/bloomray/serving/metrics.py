"""The ingress's Prometheus metrics through Ray's metrics API (scraped from Ray's metrics endpoint).

The engines' own metrics (``vllm:*``: queue, running, tokens, TTFT, inter-token latency) are
exported by Ray Serve LLM's stat logger to the same endpoint. No metric carries request text.
"""

from __future__ import annotations

import time

from ray.serve import metrics

_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000]


class ServeMetrics:
    """Request latency, time to first token, generated tokens, admitted work, errors by code."""

    def __init__(self) -> None:
        self.latency = metrics.Histogram(
            "bloomray_request_latency_ms", "request latency", boundaries=_MS, tag_keys=("route",)
        )
        self.ttft = metrics.Histogram(
            "bloomray_time_to_first_token_ms", "time to first streamed chunk", boundaries=_MS
        )
        self.tokens = metrics.Counter("bloomray_generated_tokens", "generated tokens (non-streamed)")
        self.queue = metrics.Gauge("bloomray_queue_depth", "prompts x n in flight on this ingress replica")
        self.errors = metrics.Counter("bloomray_errors", "error responses", tag_keys=("code",))

    def done(self, route: str, start: float, tokens: int) -> None:
        self.latency.observe((time.perf_counter() - start) * 1000, tags={"route": route})
        if tokens:
            self.tokens.inc(tokens)
