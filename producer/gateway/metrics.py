"""What the gateway counts, as Prometheus series in a registry of its own (``--metrics-port`` serves it):

    streamfold_gateway_requests_total{route,code}     HTTP requests answered, by route and status code
    streamfold_gateway_request_seconds{route}         histogram: time to answer (to the first byte of a stream)
    streamfold_gateway_first_chunk_seconds            histogram: a streamed call's POST to its first chunk sent
    streamfold_gateway_streams_open                   SSE streams being relayed now
    streamfold_gateway_followers                      chunk streams the hub follows now
    streamfold_gateway_streams_superseded_total       streams ended because a retry replaced text already sent
    streamfold_gateway_streams_overrun_total          streams dropped because their client fell behind
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        prefix = "streamfold_gateway_"
        self._requests = Counter(f"{prefix}requests", "HTTP requests answered.", ["route", "code"], registry=registry)
        self._latency = Histogram(f"{prefix}request_seconds", "Time to answer, to the first byte of a stream.",
                                  ["route"], buckets=LATENCY_BUCKETS, registry=registry)
        self._first_chunk = Histogram(f"{prefix}first_chunk_seconds", "A streamed call's POST to its first chunk "
                                      "sent.", buckets=LATENCY_BUCKETS, registry=registry)
        self._open = Gauge(f"{prefix}streams_open", "SSE streams being relayed now.", registry=registry)
        self._followers = Gauge(f"{prefix}followers", "Chunk streams the hub follows now.", registry=registry)
        self._superseded = Counter(f"{prefix}streams_superseded", "Streams ended because a retry replaced text "
                                   "already sent.", registry=registry)
        self._overrun = Counter(f"{prefix}streams_overrun", "Streams dropped because their client fell behind.",
                                registry=registry)
        self._server: Any = None

    def watch_followers(self, count: Callable[[], int]) -> None:
        self._followers.set_function(count)

    def answered(self, route: str, code: int, seconds: float) -> None:
        self._requests.labels(route, str(code)).inc()
        self._latency.labels(route).observe(seconds)

    def first_event(self, seconds: float) -> None:
        self._first_chunk.observe(seconds)

    def stream_opened(self) -> None:
        self._open.inc()

    def stream_closed(self) -> None:
        self._open.dec()

    def superseded(self) -> None:
        self._superseded.inc()

    def overrun(self) -> None:
        self._overrun.inc()

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        self._server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
