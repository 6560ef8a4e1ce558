"""What a worker counts: Prometheus series, and the stats record ``python -m worker stats`` reads.

The loop calls one method per thing that happened (``taken``, ``finished``, ``redis_error``, ...); nothing
here touches Redis or the loop's state: the two gauges read when scraped are handed a function that does.
Each Worker has a registry of its own, so several workers in one process (tests, benchmarks) never share a
counter. With ``--metrics-port`` a worker serves its registry:

    streamfold_worker_claims_total                      new requests claimed
    streamfold_worker_recoveries_total                  requests taken over from a worker that stopped heartbeating
    streamfold_worker_claims_lost_total                 requests a peer recovered from this one (it stalled)
    streamfold_worker_requests_finished_total{status}   results published, by final status
    streamfold_worker_duplicate_finishes_total          finishes that published nothing: finished before
    streamfold_worker_chunks_total                      chunks assembled, over every request finished here
    streamfold_worker_duplicate_chunks_total            chunks dropped as repeats or as part of an older attempt
    streamfold_worker_dead_letters_total                entries dead-lettered
    streamfold_worker_redis_errors_total                loop turns lost to Redis being unavailable
    streamfold_worker_finish_latency_seconds            histogram: producer's end marker -> result published
    streamfold_worker_tokens_total{model,type}          tokens of the results published, input and output
    streamfold_worker_cost_total{model,currency}        what the results published cost, in the currency
    streamfold_worker_in_flight                         requests being assembled now
    streamfold_worker_concurrency                       the most requests this worker assembles at once
    streamfold_worker_backlog{stream}                   the pool's requests no worker has claimed yet
    process_*                                           CPU, memory and file descriptors of the process

No worker label: each worker is its own scrape target, which names it. ``model`` is the model the upstream
named, so its values are the models the installation calls; per request, per tenant or per user figures
belong to the usage events and the analytics reading them. ``backlog`` is the one figure of the whole pool:
the worker group's lag on each control stream, which no worker's loop reads (only the housekeeping lease
holder does, every claim timeout), so it is read from Redis at each scrape, the way ``python -m worker stats``
reads it; every worker reports the same figure.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, TypedDict, cast

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from streamfold.contract import ResultRecord, UsageEvent
from streamfold.errors import ContractError

# Finish latency is milliseconds when the pool keeps up and seconds when it falls behind.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# The model label of a request no chunk named a model for, as ``producer usage --summary`` shows it.
NO_MODEL = "(none)"


class WorkerRecord(TypedDict):
    """A worker's stats record, published under ``Keys.workers()`` every ``every_ms``: its heartbeat.

    Totals since the worker started: ``finished`` requests (published or not), their ``chunks``, and
    ``held_ms``, the time they held a slot from claim to finish - so ``held_ms / finished`` is the mean hold
    time the worker-count recommendation rests on. ``updated_at_ms`` is the worker's wall clock, read against
    Redis's by ``stats`` and ``health`` (hosts keep NTP time; a skew below a second does not matter): a record
    not refreshed for three of its own intervals belongs to a worker that is gone (``housekeeping.is_fresh``).
    """

    finished: int
    chunks: int
    held_ms: int
    started_at_ms: int
    updated_at_ms: int
    in_flight: int
    concurrency: int
    every_ms: int


# Records written before ``every_ms`` existed were refreshed every claim timeout / 3 (10 s by default).
_EVERY_MS_BEFORE = 10_000


def encode_worker_record(record: WorkerRecord) -> bytes:
    return orjson.dumps(record)


def decode_worker_record(raw: bytes | str) -> WorkerRecord:
    """A published stats record; ContractError when it is not one."""
    try:
        body: Any = orjson.loads(raw)
        body.setdefault("every_ms", _EVERY_MS_BEFORE)
        return cast(WorkerRecord, {name: int(body[name]) for name in WorkerRecord.__annotations__})
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ContractError(f"not a worker stats record: {raw!r:.200}") from exc


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class WorkerMetrics:
    """One worker's counters, in a registry of its own; ``serve`` exposes them over HTTP."""

    def __init__(self, concurrency: int, *, clock_ms: Callable[[], int] = now_ms) -> None:
        self.registry = CollectorRegistry()
        self._clock_ms = clock_ms
        self._started_at_ms = clock_ms()
        self._concurrency = concurrency
        self._finished = self._chunk_total = self._held_ms = 0
        self._server: Any = None
        ProcessCollector(registry=self.registry)
        registry, prefix = self.registry, "streamfold_worker_"
        self._claims = Counter(f"{prefix}claims", "New requests claimed.", registry=registry)
        self._recoveries = Counter(f"{prefix}recoveries", "Requests taken over from a worker that stopped "
                                   "heartbeating.", registry=registry)
        self._lost = Counter(f"{prefix}claims_lost", "Requests a peer recovered from this worker.", registry=registry)
        self._published = Counter(f"{prefix}requests_finished", "Results published, by final status.", ["status"],
                                  registry=registry)
        self._repeat_finishes = Counter(f"{prefix}duplicate_finishes", "Finishes that published nothing because "
                                        "the request was finished before.", registry=registry)
        self._chunks = Counter(f"{prefix}chunks", "Chunks assembled, over every request finished here.",
                               registry=registry)
        self._duplicates = Counter(f"{prefix}duplicate_chunks", "Chunks dropped as repeats or as part of an older "
                                   "attempt.", registry=registry)
        self._dead_letters = Counter(f"{prefix}dead_letters", "Entries dead-lettered.", registry=registry)
        self._redis_errors = Counter(f"{prefix}redis_errors", "Loop turns lost to Redis being unavailable.",
                                     registry=registry)
        self._latency = Histogram(f"{prefix}finish_latency_seconds", "From the producer's end marker to the "
                                  "result published.", buckets=LATENCY_BUCKETS, registry=registry)
        self._tokens = Counter(f"{prefix}tokens", "Tokens the upstreams reported for the results published, by "
                               "the model they named and type: input (the prompt, cached input included) or output "
                               "(reasoning included). A count an upstream did not report adds nothing. One series "
                               "per model the installation calls.", ["model", "type"], registry=registry)
        self._cost = Counter(f"{prefix}cost", "What the results published cost, in units of the currency, by the "
                             "model the upstream named; a request without a price adds nothing. One series per "
                             "model the installation calls.", ["model", "currency"], registry=registry)
        self._in_flight = Gauge(f"{prefix}in_flight", "Requests being assembled now.", registry=registry)
        Gauge(f"{prefix}concurrency", "The most requests this worker assembles at once.",
              registry=registry).set(concurrency)
        self._backlog = _Backlog(f"{prefix}backlog")
        registry.register(self._backlog)
        for status in ("completed", "incomplete", "failed"):
            self._published.labels(status)  # every status shows, at 0, from the first scrape

    def watch_in_flight(self, count: Callable[[], int]) -> None:
        """Read the in-flight count when scraped, rather than setting it on every turn of the loop."""
        self._in_flight.set_function(count)

    def watch_backlog(self, read: Callable[[], Mapping[str, int]]) -> None:
        """Read the pool's backlog, control stream -> requests no worker has claimed, when scraped."""
        self._backlog.read = read

    def taken(self, how: str, count: int) -> None:
        """``count`` requests claimed (``how="claimed"``) or recovered from a stalled peer."""
        if count:
            (self._recoveries if how == "recovered" else self._claims).inc(count)

    def lost(self, count: int) -> None:
        if count:
            self._lost.inc(count)

    def finished(self, record: ResultRecord, usage: UsageEvent, *, published: bool, dead_letter: bool,
                 held_s: float) -> None:
        """A request finished here; ``published`` when this finish (not an earlier one) published it, so
        that a request's tokens and cost are counted once, however often it is finished."""
        metrics = record["metrics"]
        self._finished += 1
        self._chunk_total += metrics["chunks"]
        self._held_ms += max(0, round(held_s * 1000))
        self._chunks.inc(metrics["chunks"])
        self._duplicates.inc(metrics.get("duplicates") or 0)
        if not published:
            self._repeat_finishes.inc()
            return
        self._published.labels(record["status"]).inc()
        if dead_letter:
            self._dead_letters.inc()
        lag_ms = metrics.get("finish_lag_ms")
        if lag_ms is not None:  # None for a stalled request: it never got an end marker
            self._latency.observe(max(0.0, lag_ms / 1000))  # the producer's clock may run ahead a little
        self._spent(usage)

    def _spent(self, usage: UsageEvent) -> None:
        model = usage["model"] or NO_MODEL
        for kind, count in (("input", usage["prompt_tokens"]), ("output", usage["completion_tokens"])):
            if count is not None and count > 0:  # a counter cannot go down, whatever an upstream reports
                self._tokens.labels(model, kind).inc(count)
        cost = usage["cost"]
        if cost is not None and cost["total"] > 0:
            self._cost.labels(model, cost["currency"]).inc(cost["total"])

    def redis_error(self) -> None:
        self._redis_errors.inc()

    def record(self, in_flight: int, every_s: float) -> WorkerRecord:
        """The stats record to publish now, by a worker that publishes one every ``every_s`` seconds."""
        return WorkerRecord(finished=self._finished, chunks=self._chunk_total, held_ms=self._held_ms,
                            started_at_ms=self._started_at_ms, updated_at_ms=self._clock_ms(), in_flight=in_flight,
                            concurrency=self._concurrency, every_ms=round(every_s * 1000))

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve the registry at ``http://addr:port/metrics`` from a daemon thread; returns the bound port
        (``port=0`` picks a free one)."""
        self._server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Backlog(Collector):
    """The backlog gauge, read when scraped. A scrape never fails for it: while Redis cannot answer it
    shows no sample, and every other series of the worker is still served."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.read: Callable[[], Mapping[str, int]] | None = None

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> list[Metric]:
        family = self._family()
        if self.read is not None:
            try:
                backlog = self.read()
            except Exception:  # noqa: BLE001  (Redis away or refusing: the other series still matter)
                return [family]
            for stream, count in sorted(backlog.items()):
                family.add_metric([stream], count)
        return [family]

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(self.name, "Requests on this control stream no worker has claimed yet: the "
                                 "worker group's lag, which KEDA's lagCount reads, read from Redis when scraped. "
                                 "The pool's figure: every worker reports the same.", labels=["stream"])
