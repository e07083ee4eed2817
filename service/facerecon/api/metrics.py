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

Several server processes (``settings.processes > 1``, :mod:`facerecon.api.processes`): prometheus_client's
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set before it is imported). Every process writes its samples there
and ``/metrics``, whichever process answers it, reads them all: counters and histograms summed; the gauges of
work in flight summed over the live processes, ``facerecon_ready`` their minimum (1 when every process is ready),
``facerecon_model_info`` their maximum. Those gauges are read from the pool at scrape time in one process; with
several, each process writes them every :data:`LIVE_REFRESH_S` seconds (and the answering one right before it
answers).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["Metrics", "MetricsMiddleware"]

#: Seconds; reconstruction is ~1 s on CPU with fitting, sub-millisecond for the probes.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
#: Seconds between a process's writes of its live gauges in multiprocess mode (module docstring).
LIVE_REFRESH_S = 0.5
#: The labels of ``facerecon_model_info`` (:meth:`Metrics.set_model`).
MODEL_INFO_LABELS = ("face_model", "device", "renderer", "default_mode", "version")
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def multiprocess_on() -> bool:
    """Whether prometheus_client chose its multiprocess values when it was imported (module docstring)."""
    from prometheus_client import values

    return values.ValueClass is not values.MutexValue


class Metrics:
    """The app's collectors, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess = multiprocess_on()
        r = self.registry
        self.requests = Counter(
            "facerecon_http_requests", "HTTP requests answered, by endpoint, method and status",
            ["endpoint", "method", "status"], registry=r,
        )
        self.request_latency = Histogram(
            "facerecon_http_request_duration_seconds", "HTTP request latency, by endpoint",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.in_flight = Gauge("facerecon_http_requests_in_flight", "HTTP requests being served", registry=r,
                               multiprocess_mode="livesum")
        self.stage_latency = Histogram(
            "facerecon_stage_duration_seconds", "Time per processing stage of a request",
            ["stage"], buckets=STAGE_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge("facerecon_inference_queue_depth", "Inference jobs waiting for a worker", registry=r,
                                 multiprocess_mode="livesum")
        self.inference_active = Gauge("facerecon_inference_active", "Inference jobs running", registry=r,
                                      multiprocess_mode="livesum")
        self.admitted = Gauge("facerecon_requests_admitted",
                              "Requests holding an inference slot (reading, decoding, queued or running)", registry=r,
                              multiprocess_mode="livesum")
        self.decode_bytes = Gauge("facerecon_decode_memory_bytes", "Bytes reserved by the decodes in flight",
                                  registry=r, multiprocess_mode="livesum")
        self.ready = Gauge("facerecon_ready", "1 when the models are loaded and warmed up", registry=r,
                           multiprocess_mode="livemin")
        # an info metric as a labelled gauge of 1 (the same exposition; Info has no multiprocess mode)
        self.model_info = Gauge("facerecon_model_info", "The served face model and backends", MODEL_INFO_LABELS,
                                registry=r, multiprocess_mode="livemax")
        self._live: list[tuple[Gauge, Callable[[], float]]] = []
        self._refresher: threading.Thread | None = None
        self._stop = threading.Event()

    def live(self, gauge: Gauge, read: Callable[[], float]) -> None:
        """``gauge`` reads ``read()``: at scrape time in one process, every :data:`LIVE_REFRESH_S` with several."""
        if not self.multiprocess:
            gauge.set_function(read)
            return
        gauge.set(read())
        self._live.append((gauge, read))
        if self._refresher is None:
            self._refresher = threading.Thread(target=self._refresh_loop, name="facerecon-metrics", daemon=True)
            self._refresher.start()

    def _refresh(self) -> None:
        for gauge, read in list(self._live):
            try:
                gauge.set(read())
            except Exception:  # a gauge must never take the process down
                continue

    def _refresh_loop(self) -> None:
        while not self._stop.wait(LIVE_REFRESH_S):
            self._refresh()

    def close(self) -> None:
        self._stop.set()

    def bind_pool(self, waiting: Callable[[], float], running: Callable[[], float],
                  admitted: Callable[[], float]) -> None:
        """Read the queue gauges from the pool (always exact at scrape time in one process, no bookkeeping)."""
        self.live(self.queue_depth, waiting)
        self.live(self.inference_active, running)
        self.live(self.admitted, admitted)

    def observe_stages(self, timings_ms: Mapping[str, float]) -> None:
        for stage, ms in timings_ms.items():
            self.stage_latency.labels(stage=stage).observe(max(0.0, ms) / 1000.0)

    def set_model(self, info: Mapping[str, str]) -> None:
        if not self.multiprocess:  # (one call per process: nothing to clear with several)
            self.model_info.clear()
        self.model_info.labels(**{k: str(info.get(k, "")) for k in MODEL_INFO_LABELS}).set(1.0)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type (every process's samples in multiprocess mode)."""
        if not self.multiprocess:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        from prometheus_client import multiprocess

        self._refresh()
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return generate_latest(merged), CONTENT_TYPE_LATEST


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
