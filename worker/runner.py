"""The worker loop: claim requests, read their chunk streams, assemble them, finish each exactly once.

One thread serves up to ``concurrency`` requests at once; each turn of the loop is a handful of named steps
(``Worker._step``), each a few Redis round trips through the Broker. Nothing here is lost when Redis goes
away or refuses a command: the loop backs off and retries with all in-memory state kept, and whatever a
dead worker held is recovered by its peers after the claim timeout. Time spent waiting on Redis never
counts towards a request's stall timeout. Nothing a producer writes reaches this loop as an exception:
each request's entries and outcome are guarded in ``RequestState``, and the Broker reports a request whose
keys Redis refuses on its own (``StreamsRefused``, ``Finished.refused``).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import random
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager


from streamfold.connection import connect, preflight, refresh_layout
from streamfold.errors import ConfigError, RedisRefused, RedisUnavailable
from streamfold.logs import EventLog, configure_logging
from streamfold.settings import Settings, load_settings
from worker.broker import Broker, Claim, Finish, StreamsRefused
from worker.housekeeping import RECORD_EVERY_S, Housekept, Housekeeper
from worker.limits import Limits
from worker.metrics import WorkerMetrics, now_ms
from worker.pricing import PriceBook
from worker.request import RequestState
from worker.stats import take_sample

log = logging.getLogger("streamfold.worker")

# The shortest time between two reads. A read names every request in flight and returns as soon as any of
# them has one new entry, so under load a loop without a floor turns over a few entries at a time and
# spends itself on the per-read cost. A couple of milliseconds gathers them into batches.
READ_INTERVAL = 0.002

# Unexpected faults in a row after which the worker gives up and exits non-zero.
MAX_CONSECUTIVE_FAULTS = 5

# A read that returns this much later than it was allowed to block spent the difference waiting on Redis.
SLOW_READ_MARGIN = 0.1

# The settings a worker reads, in the order ``python -m worker run --help`` lists them.
WORKER_SETTINGS = ("redis_url", "namespace", "shards", "group", "concurrency", "read_count", "block_ms",
                   "socket_timeout", "stall_timeout", "claim_timeout", "shutdown_grace", "result_ttl", "chunk_ttl",
                   "results_max_age", "usage_max_age", "dead_letter_max_age", "dead_consumer_idle", "max_chunk_bytes",
                   "max_chunks", "max_request_bytes", "max_json_depth", "prices", "metrics_port", "log_format")


class Worker:
    """Serves requests from the control streams until stopped or, in burst mode, until none are left.

    Beside the pipeline, now and then: publishes its stats record (at each heartbeat) and takes its turn at
    the pool's housekeeping (worker/housekeeping.py). ``metrics`` counts what it does, in a registry of its own.
    """

    def __init__(self, broker: Broker, settings: Settings, *, concurrency: int | None = None, burst: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.broker, self.burst = broker, burst
        self.concurrency = concurrency or settings.concurrency
        self._settings = settings
        self._limits = Limits.from_settings(settings)
        settings.require("prices")
        self._prices = PriceBook(settings.prices)
        self._clock = clock
        self._requests: dict[str, RequestState] = {}
        self.metrics = WorkerMetrics(self.concurrency)
        self.metrics.watch_in_flight(lambda: len(self._requests))
        self.metrics.watch_backlog(lambda: {shard.stream: shard.backlog
                                            for shard in take_sample(broker.client, settings).shards})
        self.housekeeper = Housekeeper(broker.client, settings, broker.consumer)
        self._log = EventLog(log, worker=broker.consumer)
        self._backoff = Backoff()
        now = clock()
        self._heartbeat = Every(settings.claim_timeout / 3, now)
        self._record_every = min(settings.claim_timeout / 3, RECORD_EVERY_S)
        self._record = Every(self._record_every, now)
        self._recovery = Every(settings.claim_timeout / 2, now, at_start=True)
        self._housekeeping = Every(settings.claim_timeout, now, at_start=True)
        self._joined = False
        self._faults = 0
        self._last_read = 0.0
        self._drain_until: float | None = None
        self._done = False

    def run(self) -> int:
        """Serve until done; returns the process exit code, 0. SIGTERM/SIGINT start a drain (``stop``)."""
        with _signals_handled(self.stop):
            while not self._done:
                try:
                    self._step()
                except (RedisUnavailable, RedisRefused) as exc:
                    self._wait_out(exc)
                except Exception:
                    self._survive_fault()
                else:
                    self._backoff.reset()
                    self._faults = 0
            self._leave()
        return 0

    def stop(self) -> None:
        """Stop claiming; finish what is in flight for up to ``shutdown_grace`` seconds, then hand back the
        rest. A second call hands back at once."""
        now = self._clock()
        if self._drain_until is None:
            self._drain_until = now + self._settings.shutdown_grace
            self._log.info("draining", in_flight=len(self._requests), grace_s=self._settings.shutdown_grace)
        else:
            self._drain_until = now

    def _step(self) -> None:
        self._join()
        idle = not self._requests
        claimed = self._claim_new()
        self._read_and_feed()
        self._expire_stalled()
        self._finish_ended()
        self._heartbeat_if_due()
        self._publish_stats_if_due()
        recovered = self._recover_if_due(force=self.burst and idle and not claimed)
        self._housekeep_if_due()
        self._check_done(idle=idle and not claimed and not recovered)

    # --- steps -----------------------------------------------------------------------------------------

    def _join(self) -> None:
        if not self._joined:
            self.broker.ensure_group()
            self._publish_stats()
            self._joined = True
            self._log.info("worker_started", group=self.broker.group, concurrency=self.concurrency, burst=self.burst)

    def _claim_new(self) -> int:
        free = self.concurrency - len(self._requests)
        if self._drain_until is not None or free <= 0:
            return 0
        block_ms = 0 if self._requests or self.burst else self._wait_ms()
        claims = self.broker.claim(free, block_ms=block_ms, skip_quiet=bool(self._requests))
        return self._adopt(claims, "claimed")

    def _read_and_feed(self) -> None:
        if not self._requests:
            return
        cursors = {rid: state.cursor for rid, state in self._requests.items() if not state.ended}
        watch = self._drain_until is None and len(self._requests) < self.concurrency
        pause = self._last_read + READ_INTERVAL - self._clock()
        if pause > 0:
            time.sleep(pause)
        self._last_read = self._clock()
        block_ms = self._wait_ms()
        try:
            batches = self.broker.read(cursors, watch=watch, block_ms=block_ms)
        except StreamsRefused as refused:
            for request_id, problem in refused.problems.items():
                self._requests[request_id].refuse(problem)
            return
        now = self._clock()
        self._discount_redis_time(now - self._last_read - block_ms / 1000)
        for request_id, entries in batches.items():
            state = self._requests[request_id]
            for entry_id, fields in entries:
                if state.feed(entry_id, fields, now):
                    break

    def _expire_stalled(self) -> None:
        now = self._clock()
        for state in self._requests.values():
            if state.check_stall(now, self._settings.stall_timeout):
                self._log.warning("request_stalled", request_id=state.request_id,
                                  stall_timeout_s=self._settings.stall_timeout)

    def _finish_ended(self) -> None:
        ended = [state for state in self._requests.values() if state.ended]
        if not ended:
            return
        finished_at_ms = now_ms()
        outcomes = [state.outcome(finished_at_ms) for state in ended]
        replies = self.broker.finish([
            Finish(state.request_id, tuple(state.entries), outcome.record["status"], outcome.encoded_record,
                   outcome.encoded_usage, outcome.dead_letter, outcome.token, finished_at_ms)
            for state, outcome in zip(ended, outcomes)])
        now = self._clock()
        refused = []
        for state, outcome, reply in zip(ended, outcomes, replies):
            if reply.refused is not None:
                refused.append(reply.refused)  # kept in flight, finished again after the backoff
                continue
            del self._requests[state.request_id]
            record, dead = outcome.record, outcome.dead_letter
            self.metrics.finished(record, outcome.usage, published=reply.published,
                                  dead_letter=dead is not None or reply.reused, held_s=now - state.claimed_at)
            if dead is not None:
                self._log.warning("entry_dead_lettered", request_id=state.request_id, entry=dead.entry_id,
                                  reason=dead.reason)
            if reply.reused:
                self._log.warning("request_id_reused", request_id=state.request_id, entries=state.entries)
            # published=false: finished before (by a peer, or a retried finish); nothing published again.
            self._log.info("request_finished", request_id=state.request_id, status=record["status"],
                           chunks=record["metrics"]["chunks"], published=reply.published)
        if refused:
            raise RedisRefused(f"Redis refused to finish {len(refused)} requests: {refused[0]}")

    def _heartbeat_if_due(self) -> None:
        now = self._clock()
        if not self._heartbeat.due(now):
            return
        if self._requests:
            owned = self.broker.heartbeat({rid: state.entries for rid, state in self._requests.items()})
            for request_id, state in list(self._requests.items()):
                state.entries = owned.get(request_id, [])
                if not state.entries:  # this worker stalled past the claim timeout and a peer took it over
                    del self._requests[request_id]
                    self.metrics.lost(1)
                    self._log.warning("claim_lost", request_id=request_id)
        self._heartbeat.reset(now)

    def _publish_stats_if_due(self) -> None:
        now = self._clock()
        if self._record.due(now):
            self._publish_stats()
            self._record.reset(now)

    def _recover_if_due(self, *, force: bool) -> int:
        now = self._clock()
        free = self.concurrency - len(self._requests)
        if self._drain_until is not None or not (force or self._recovery.due(now)):
            return 0
        recovered = self._adopt(self.broker.recover_stalled(free), "recovered") if free > 0 else 0
        self._recovery.reset(now)
        return recovered

    def _housekeep_if_due(self) -> None:
        now = self._clock()
        if self._drain_until is None and self._housekeeping.due(now):
            done = self.housekeeper.run(lease_s=self._settings.claim_timeout)
            if done is not None:
                self._log_housekeeping(done)
            self._housekeeping.reset(now)

    def _check_done(self, *, idle: bool) -> None:
        """Draining: done when nothing is in flight any more. Burst: done after a turn that began with
        nothing in flight and found nothing to claim or recover."""
        if self._drain_until is not None:
            if self._requests and self._clock() >= self._drain_until:
                self._hand_back()
            self._done = not self._requests
        elif self.burst and idle:
            self._done = True

    # --- helpers ---------------------------------------------------------------------------------------

    def _adopt(self, claims: Sequence[Claim], how: str) -> int:
        """Serve newly claimed requests; a request already served here just gains the extra entry to ack."""
        now, adopted = self._clock(), 0
        for claim in claims:
            state = self._requests.get(claim.request_id)
            if state is not None:
                if claim.entry_id not in state.entries:
                    state.entries.append(claim.entry_id)
            elif len(self._requests) < self.concurrency:
                self._requests[claim.request_id] = RequestState(claim.request_id, claim.entry_id, now, self._limits,
                                                              self._prices)
                adopted += 1
                self._log.log(logging.INFO if how == "recovered" else logging.DEBUG, f"request_{how}",
                              request_id=claim.request_id, entry=claim.entry_id)
            # else: beyond capacity (own pending re-read after a restart); recovery hands it out later.
        self.metrics.taken(how, adopted)
        return adopted

    def _publish_stats(self) -> None:
        self.housekeeper.publish(self.metrics.record(len(self._requests), self._record_every))

    def _hand_back(self) -> None:
        self.broker.hand_back({rid: state.entries for rid, state in self._requests.items()})
        self._log.warning("requests_handed_back", count=len(self._requests), request_ids=list(self._requests))
        self._requests.clear()

    def _log_housekeeping(self, done: Housekept) -> None:
        for problem in done.problems:
            self._log.warning("housekeeping_failed", problem=problem)
        removed = done.consumers_removed or done.workers_forgotten
        self._log.log(logging.INFO if removed else logging.DEBUG, "housekept", consumers_removed=done.consumers_removed,
                      workers_forgotten=done.workers_forgotten, entries_trimmed=sum(done.trimmed.values()))

    def _wait_ms(self) -> int:
        """How long a read may block: until the next timer, stall deadline or end of the drain."""
        now = self._clock()
        if any(state.ended for state in self._requests.values()):
            return 0
        deadlines = [self._heartbeat.next, self._record.next]
        deadlines += [state.stall_deadline(self._settings.stall_timeout) for state in self._requests.values()]
        if self._drain_until is None:
            deadlines += [self._recovery.next, self._housekeeping.next]
        else:
            deadlines.append(self._drain_until)
        seconds = min(self._settings.block_ms / 1000, min(deadlines) - now)
        return max(0, math.ceil(seconds * 1000))

    def _wait_out(self, exc: RedisUnavailable | RedisRefused) -> None:
        """Back off after Redis could not serve, or refused a command (an ACL, a key of the wrong type
        that is the pool's and not one request's): both may be put right while the worker waits."""
        self.metrics.redis_error()
        event = "redis_unavailable" if isinstance(exc, RedisUnavailable) else "redis_refused"
        if self._drain_until is not None and (not self._requests or self._clock() >= self._drain_until):
            # Exits with what is in flight unfinished: peers recover it after the claim timeout.
            self._log.error(f"{event}_while_draining", error=str(exc), unfinished=len(self._requests))
            self._done = True
            return
        delay = self._backoff.next_delay()
        self._log.log(logging.WARNING if isinstance(exc, RedisUnavailable) else logging.ERROR, event, error=str(exc),
                      retry_in_s=round(delay, 3))
        time.sleep(delay)
        if isinstance(exc, RedisUnavailable):
            refresh_layout(self.broker.client)  # on a cluster, after a failover: where each slot is served now
        now = self._clock()
        for state in self._requests.values():
            # An outage is not a stall: nothing could be read meanwhile, so the stall clocks restart.
            state.last_activity = max(state.last_activity, now)

    def _discount_redis_time(self, waited: float) -> None:
        """A read that came back late spent that time waiting on Redis: not a silence of the requests."""
        if waited > SLOW_READ_MARGIN:
            for state in self._requests.values():
                state.last_activity += waited

    def _survive_fault(self) -> None:
        """A fault in this worker's own code or an unexpected Redis reply: log it, back off and go on with
        all state kept. A race that trips once must not take down every worker of the pool at the same
        moment; a fault that repeats is a bug, and the worker exits so that it is seen and restarted (its
        requests are recovered by peers after the claim timeout)."""
        self._faults += 1
        self._log.exception("worker_fault", consecutive=self._faults)
        if self._faults >= MAX_CONSECUTIVE_FAULTS:
            raise
        time.sleep(self._backoff.next_delay())

    def _leave(self) -> None:
        try:
            self.broker.leave()
            self.housekeeper.withdraw()
        except RedisUnavailable as exc:
            self._log.warning("leave_failed", error=str(exc))
        self._log.info("worker_stopped")


class Every:
    """A repeating deadline on the worker's clock; ``reset`` after the action succeeded."""

    def __init__(self, interval: float, now: float, *, at_start: bool = False) -> None:
        self.interval = interval
        self.next = now if at_start else now + interval

    def due(self, now: float) -> bool:
        return now >= self.next

    def reset(self, now: float) -> None:
        self.next = now + self.interval


class Backoff:
    """Exponential backoff with jitter, capped, so a pool of workers does not reconnect in lockstep."""

    def __init__(self, base: float = 0.05, cap: float = 2.0) -> None:
        self.base, self.cap, self.failures = base, cap, 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.base * 2.0 ** min(self.failures, 30)) * random.uniform(0.5, 1.0)
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0


@contextmanager
def _signals_handled(stop: Callable[[], None]) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread can take signals; a worker run in a thread is stopped with stop()
        return
    previous = {sig: signal.signal(sig, lambda _sig, _frame: stop()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def consumer_name() -> str:
    """A consumer name unique to this process: host, pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def serve(*, concurrency: int | None = None, burst: bool = False, name: str | None = None,
          metrics_port: int | None = None, log_format: str | None = None) -> int:
    """Run one worker process with settings from the environment; returns its exit code.

    ``metrics_port`` and ``log_format`` override ``STREAMFOLD_METRICS_PORT`` and ``STREAMFOLD_LOG_FORMAT``.
    """
    if concurrency is not None and concurrency < 1:
        raise ConfigError(f"concurrency must be at least 1, got {concurrency}")
    settings = load_settings()
    configure_logging(log_format or settings.log_format)
    port = metrics_port if metrics_port is not None else settings.metrics_port
    client = connect(settings)
    try:
        preflight(client)
        worker = Worker(Broker.from_settings(client, settings, name or consumer_name()), settings,
                        concurrency=concurrency, burst=burst)
        if port is not None:
            try:
                port = worker.metrics.serve(port)
            except OSError as exc:
                raise ConfigError(f"cannot serve metrics on port {port}: {exc}") from exc
            EventLog(log, worker=worker.broker.consumer).info("metrics_served", port=port)
        # What exists now lives as long as the process. Frozen, it is left out of the collector's full
        # passes, which otherwise stop the loop for tens of milliseconds at a time once it is busy.
        gc.freeze()
        try:
            return worker.run()
        finally:
            worker.metrics.close()
    finally:
        client.close()
