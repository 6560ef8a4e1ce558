"""What a runner counts: Prometheus series, and the stats record ``python -m producer runners`` shows.

    streamfold_runner_calls_in_flight                calls held now
    streamfold_runner_concurrency                    the most calls this runner holds at once
    streamfold_runner_calls_total{outcome}           calls ended: ended, failed, cancelled, skipped, lost, error
    streamfold_runner_chunks_total                   chunks relayed from upstreams to Redis
    streamfold_runner_time_to_first_chunk_seconds    histogram: job taken -> first chunk from the upstream
    streamfold_runner_upstream_errors_total{status}  failed upstream calls by HTTP status ("none": no answer)
    streamfold_runner_reruns_total                   calls re-run after their runner died or handed them back
    streamfold_runner_redis_errors_total             sends to Redis that failed and were retried
    process_*                                        CPU, memory and file descriptors of the process

Each runner has a registry of its own and is its own scrape target, so there is no runner label.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server

from producer.runner.calls import CallHooks

FIRST_CHUNK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
OUTCOMES = ("ended", "failed", "cancelled", "skipped", "lost", "error")


class RunnerMetrics(CallHooks):
    """One runner's counters; ``serve`` exposes them over HTTP."""

    def __init__(self, concurrency: int) -> None:
        self.registry = CollectorRegistry()
        self.concurrency = concurrency
        self.started_at_ms = time.time_ns() // 1_000_000
        self.totals: dict[str, int] = dict.fromkeys(("calls", "chunks", "reruns"), 0)
        self._endpoint: list[Any] = []
        ProcessCollector(registry=self.registry)
        registry, prefix = self.registry, "streamfold_runner_"
        self._in_flight = Gauge(f"{prefix}calls_in_flight", "Calls held now.", registry=registry)
        Gauge(f"{prefix}concurrency", "The most calls this runner holds at once.", registry=registry).set(concurrency)
        self._calls = Counter(f"{prefix}calls", "Calls ended, by outcome.", ["outcome"], registry=registry)
        self._chunks = Counter(f"{prefix}chunks", "Chunks relayed from upstreams to Redis.", registry=registry)
        self._first_chunk = Histogram(f"{prefix}time_to_first_chunk_seconds", "From the job taken to the first "
                                      "chunk from the upstream.", buckets=FIRST_CHUNK_BUCKETS, registry=registry)
        self._upstream_errors = Counter(f"{prefix}upstream_errors", "Failed upstream calls, by HTTP status.",
                                        ["status"], registry=registry)
        self._reruns = Counter(f"{prefix}reruns", "Calls re-run after their runner died or handed them back.",
                               registry=registry)
        self._redis_errors = Counter(f"{prefix}redis_errors", "Sends to Redis that failed and were retried.",
                                     registry=registry)
        for outcome in OUTCOMES:
            self._calls.labels(outcome)

    def watch_in_flight(self, count: Callable[[], int]) -> None:
        self._in_flight.set_function(count)

    def chunk(self, first: bool, since: float) -> None:
        self._chunks.inc()
        self.totals["chunks"] += 1
        if first:
            self._first_chunk.observe(since)

    def upstream_error(self, status: int | None) -> None:
        self._upstream_errors.labels("none" if status is None else str(status)).inc()

    def redis_error(self) -> None:
        self._redis_errors.inc()

    def ended(self, outcome: str) -> None:
        self._calls.labels(outcome).inc()
        self.totals["calls"] += 1

    def rerun(self) -> None:
        self._reruns.inc()
        self.totals["reruns"] += 1

    def record(self, in_flight: int) -> dict[str, object]:
        """The stats record published with each lease renewal."""
        return {"in_flight": in_flight, "concurrency": self.concurrency, "started_at_ms": self.started_at_ms,
                "updated_at_ms": time.time_ns() // 1_000_000, **self.totals}

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve the registry at ``http://addr:port/metrics`` from a daemon thread; returns the bound port."""
        server, _ = start_http_server(port, addr=addr, registry=self.registry)
        self._endpoint.append(server)
        return int(server.server_port)

    def close(self) -> None:
        """Stop serving the metrics, if they were served."""
        for server in self._endpoint:
            server.shutdown()
            server.server_close()
        self._endpoint.clear()
