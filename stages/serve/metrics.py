"""Prometheus metrics of one serve replica, answered at GET /metrics.

Every series carries `model_name` and `replica` (Ray Serve's replica id) labels. Each replica
counts only its own work, and a scrape through Serve's proxy reaches one replica (whichever
the proxy picks), so with several replicas a series is per replica and a dashboard sums them
(`sum by (model_name) (rate(glm_serve_generation_tokens_total[1m]))`); docs/serve.md.
"""

from __future__ import annotations

from typing import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from stages.serve.engine import RATE_WINDOW_S, DecodeEngine, EngineObserver

ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/glm/fill", "/v1/models", "/v1/tokenize",
                    "/v1/detokenize", "/health", "/metrics", "/", "/docs", "/openapi.json"})
"""Routes counted under their own label; any other path counts as 'other' (bounded label values)."""
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServeMetrics(EngineObserver):
    """A replica's registry: HTTP requests by route and status, the engine's queue, running rows,
    generated tokens and rate, and the token latency histograms (the engine reports timings)."""

    def __init__(self, model_name: str, replica: str):
        self.labels = {"model_name": model_name, "replica": replica}
        self.registry = CollectorRegistry()
        names = list(self.labels)
        self._requests = Counter("glm_serve_http_requests", "HTTP requests answered, by route and status code",
                                 names + ["route", "status"], registry=self.registry)
        self._ttft = Histogram("glm_serve_time_to_first_token_seconds",
                               "Time from a generation's submission to its first token", names,
                               buckets=TTFT_BUCKETS, registry=self.registry).labels(**self.labels)
        self._tpot = Histogram("glm_serve_time_per_output_token_seconds",
                               "Time between consecutive tokens of one generation", names,
                               buckets=TPOT_BUCKETS, registry=self.registry).labels(**self.labels)

    def watch(self, engine: DecodeEngine) -> None:
        """Report `engine`'s queue, rows and tokens at every scrape."""
        self.registry.register(_EngineCollector(engine, self.labels))

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def next_token(self, seconds: float) -> None:
        self._tpot.observe(seconds)

    def count_request(self, route: str, status: int) -> None:
        route = route if route in ROUTES else "other"
        self._requests.labels(**self.labels, route=route, status=str(status)).inc()

    def counting(self, route: str, send: Callable[[dict], Awaitable[None]]) -> Callable[[dict], Awaitable[None]]:
        """An ASGI `send` that counts the response's status under `route`."""
        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.count_request(route, message["status"])
            await send(message)
        return counted

    def render(self) -> bytes:
        """The Prometheus text exposition of this replica's metrics."""
        return generate_latest(self.registry)


class _EngineCollector:
    """Reads the engine's state at scrape time (the engine itself knows nothing of Prometheus)."""

    def __init__(self, engine: DecodeEngine, labels: dict[str, str]):
        self.engine, self.names, self.values = engine, list(labels), list(labels.values())

    def collect(self):
        load = self.engine.load
        for family, name, text, value in (
            (GaugeMetricFamily, "glm_serve_requests_waiting", "Generations waiting for a batch slot (queue length)",
             load["waiting"]),
            (GaugeMetricFamily, "glm_serve_requests_running", "Generations decoding now (batch rows and beam searches)",
             load["running"]),
            (CounterMetricFamily, "glm_serve_generation_tokens", "Tokens generated", load["tokens_generated"]),
            (GaugeMetricFamily, "glm_serve_generation_tokens_per_second",
             f"Tokens generated per second over the last {RATE_WINDOW_S:g} s", self.engine.tokens_per_s()),
        ):
            metric = family(name, text, labels=self.names)
            metric.add_metric(self.values, value)
            yield metric
