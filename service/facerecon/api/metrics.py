"""Prometheus metrics, one :class:`~prometheus_client.CollectorRegistry` per app (two apps in one process, as in
the tests, never share or clash).

Exposed at ``GET /metrics`` (text format 0.0.4):

==============================================  =========  ===================================================
``facerecon_http_requests_total``               counter    ``endpoint`` (route template), ``method``, ``status``
``facerecon_http_request_duration_seconds``     histogram  ``endpoint``: wall time from request to response
``facerecon_http_requests_in_flight``           gauge      HTTP requests being served now
``facerecon_stage_duration_seconds``            histogram  ``stage``: ``read`` (upload), ``image`` (decoding),
                                                           ``queue`` (wait for a worker), the pipeline's stages
                                                           from ``Reconstruction.timings`` (``detect``,
                                                           ``align``, ``skin``, ``rnet``, ``fit``, ``decode``,
                                                           ``export``, ``render``), ``encode`` (response body)
``facerecon_inference_queue_depth``             gauge      jobs waiting for a worker
``facerecon_inference_active``                  gauge      jobs a worker is running
``facerecon_requests_admitted``                 gauge      requests holding a slot (reading, decoding, queued,
                                                           running)
``facerecon_decode_memory_bytes``               gauge      bytes reserved by the decodes in flight
``facerecon_ready``                             gauge      1 once models are loaded and warmed up
``facerecon_model_info``                        info       face model, device, renderer, mode, version
==============================================  =========  ===================================================

Unmatched paths are counted under ``endpoint="unmatched"`` so random URLs cannot blow up the label set.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["Metrics", "MetricsMiddleware"]

#: Seconds; reconstruction is ~1 s on CPU with fitting, sub-millisecond for the probes.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The app's collectors, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "facerecon_http_requests", "HTTP requests answered, by endpoint, method and status",
            ["endpoint", "method", "status"], registry=r,
        )
        self.request_latency = Histogram(
            "facerecon_http_request_duration_seconds", "HTTP request latency, by endpoint",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.in_flight = Gauge("facerecon_http_requests_in_flight", "HTTP requests being served", registry=r)
        self.stage_latency = Histogram(
            "facerecon_stage_duration_seconds", "Time per processing stage of a request",
            ["stage"], buckets=STAGE_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge("facerecon_inference_queue_depth", "Inference jobs waiting for a worker", registry=r)
        self.inference_active = Gauge("facerecon_inference_active", "Inference jobs running", registry=r)
        self.admitted = Gauge("facerecon_requests_admitted",
                              "Requests holding an inference slot (reading, decoding, queued or running)", registry=r)
        self.decode_bytes = Gauge("facerecon_decode_memory_bytes", "Bytes reserved by the decodes in flight",
                                  registry=r)
        self.ready = Gauge("facerecon_ready", "1 when the models are loaded and warmed up", registry=r)
        self.model_info = Info("facerecon_model", "The served face model and backends", registry=r)

    def bind_pool(self, waiting: Callable[[], float], running: Callable[[], float],
                  admitted: Callable[[], float]) -> None:
        """Read the queue gauges from the pool at scrape time (always exact, no bookkeeping)."""
        self.queue_depth.set_function(waiting)
        self.inference_active.set_function(running)
        self.admitted.set_function(admitted)

    def observe_stages(self, timings_ms: Mapping[str, float]) -> None:
        for stage, ms in timings_ms.items():
            self.stage_latency.labels(stage=stage).observe(max(0.0, ms) / 1000.0)

    def set_model(self, info: Mapping[str, str]) -> None:
        self.model_info.info({k: str(v) for k, v in info.items()})

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Pure ASGI middleware: counts every HTTP request by route template and status, times it, tracks in-flight.

    Installed outermost (outside the error mapping), so it sees the final status, 500s included.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        t0 = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint=endpoint, method=scope.get("method", ""), status=str(status)).inc()
            self.metrics.request_latency.labels(endpoint=endpoint).observe(time.perf_counter() - t0)
