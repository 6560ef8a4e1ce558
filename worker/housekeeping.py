"""The worker pool's housekeeping, and each worker's stats record: the Redis seam for both.

    publish           write this worker's stats record (``Keys.workers()``), its heartbeat, every few seconds
    withdraw          delete it, when the worker leaves cleanly
    run               once a round for the whole pool, by the worker that takes the lease:
      reap_consumers    remove consumers of dead workers once they hold nothing pending
      forget_workers    drop stats records of workers silent for longer than ``dead_consumer_idle``
      trim_outputs      trim the results, usage and dead-letter streams by age, never past what a group needs

Dead consumers. A worker that crashed leaves its consumer in the group; its pending requests are recovered
by peers after the claim timeout, and then it holds nothing. Such a consumer is removed once it has been
idle for ``dead_consumer_idle`` and no fresh stats record says its worker is alive. The removal itself is a
script that checks, in the same step, that the consumer still owns nothing (worker/lua/leave.lua): deleting
a consumer drops its pending entries, and those requests would never be recovered. Removing a consumer
that turns out to be alive costs nothing: its next read creates it again.

Loss-free trimming. The results, usage and dead-letter streams would grow without bound; each is trimmed
with ``XTRIM MINID`` (never MAXLEN, which deletes entries no one has read) below the lower of

  - the newest id older than the stream's max age (``STREAMFOLD_RESULTS_MAX_AGE``, ``_USAGE_MAX_AGE``,
    ``_DEAD_LETTER_MAX_AGE``), and
  - for every consumer group on the stream, its oldest pending entry and the entry after its
    last-delivered id.

So an analytics consumer reading through its own group loses nothing: no entry it has not been delivered,
and none delivered but not yet acknowledged, is ever trimmed, however old. The price: a group that stops
acknowledging (or is abandoned) holds the stream from its position on - watch its lag and pending count
(``XINFO GROUPS``) and delete a group no one reads any more. A stream without groups (the results stream,
usually: backends look results up by key or follow the stream live) is bounded by age alone. Computing the
bound first and trimming after is safe: what arrives or is delivered meanwhile is newer. A group created
in between with an id below the bound starts where the stream now starts.

Every command names one key, so the same code runs on Redis Cluster; the two pool-wide keys (the stats
records and the lease) are single keys without a shard tag.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import redis
from redis.commands.core import Script

from streamfold.errors import ContractError
from streamfold.settings import Settings
from streamfold.connection import unavailable
from worker.broker import lua_source, next_id, parse_id
from worker.metrics import WorkerRecord, decode_worker_record, encode_worker_record

ConsumerState = Literal["live", "quiet", "dead"]
RecordState = Literal["fresh", "stale"] | None

# A worker publishes its stats record this often at most (less when the claim timeout is short): the
# heartbeat its liveness is read from.
RECORD_EVERY_S = 2.0
# A record is stale after this many missed refreshes, plus a second of clock skew between hosts.
_MISSES, _SKEW_MS = 3, 1_000


def consumer_state(pending: int, idle_ms: int, record: RecordState, settings: Settings) -> ConsumerState:
    """What a consumer of the worker group is, from its worker's own heartbeat first.

    live: its worker's stats record is fresh (``is_fresh``).
    dead: its record went stale - the worker was killed, or hangs - or, for a consumer without a record
    (forgotten, or written by a worker that never published one), it holds pending entries and has not read
    for a claim timeout, or has been silent for ``dead_consumer_idle``. Peers recover what a dead consumer
    holds once its claims are a claim timeout old; housekeeping removes it once it holds nothing.
    quiet: a consumer without a record otherwise.

    How recently a consumer touched Redis never makes it live: a worker SIGKILLed a second ago touched Redis
    a second ago. Every worker publishes its record before its first read, so only consumers of something
    else, or forgotten ones, have none.
    """
    if record == "fresh":
        return "live"
    if record == "stale":
        return "dead"
    if pending and idle_ms > settings.claim_timeout * 1000 or idle_ms >= settings.dead_consumer_idle * 1000:
        return "dead"
    return "quiet"


def read_worker_records(raw: dict[bytes, bytes]) -> dict[str, WorkerRecord]:
    """The stats records of ``HGETALL Keys.workers()``, by consumer name; unreadable ones are skipped."""
    records = {}
    for name, value in raw.items():
        try:
            records[name.decode()] = decode_worker_record(value)
        except (ContractError, UnicodeDecodeError):
            continue
    return records


@dataclass
class Housekept:
    """What one round of housekeeping did."""

    consumers_removed: list[str] = field(default_factory=list)
    workers_forgotten: list[str] = field(default_factory=list)
    trimmed: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


class Housekeeper:
    """Housekeeping commands of one worker, and its stats record."""

    def __init__(self, client: redis.Redis, settings: Settings, consumer: str) -> None:
        self.keys, self.group, self.consumer = settings.keys, settings.group, consumer
        self._redis: Any = client  # redis-py's reply unions, as in worker/broker.py
        self._settings = settings
        # Records refresh every claim_timeout / 3: never forget one sooner than a claim timeout.
        self._forget_after_ms = int(max(settings.dead_consumer_idle, settings.claim_timeout) * 1000)
        self._leave: Script = client.register_script(lua_source("leave"))

    def publish(self, record: WorkerRecord) -> None:
        """Write this worker's stats record; the whole hash expires once no worker writes for a long while."""
        key = self.keys.workers()
        with unavailable():
            with self._redis.pipeline(transaction=False) as pipe:
                pipe.hset(key, self.consumer, encode_worker_record(record))
                pipe.pexpire(key, self._forget_after_ms)
                pipe.execute()

    def withdraw(self) -> None:
        with unavailable():
            self._redis.hdel(self.keys.workers(), self.consumer)

    def run(self, lease_s: float) -> Housekept | None:
        """One round for the whole pool, if this worker takes the lease for the next ``lease_s`` seconds
        (None when another worker holds it): with every worker trying now and then, about one round runs
        per ``lease_s``, however large the pool."""
        with unavailable():
            if not self._redis.set(self.keys.housekeeping(), self.consumer, nx=True, px=max(1, int(lease_s * 1000))):
                return None
        done = Housekept()
        try:
            now_ms = self.server_time_ms()
            records = self.records()
            done.workers_forgotten = self.forget_workers(records, now_ms)
            done.consumers_removed = self.reap_consumers(
                {name for name, record in records.items() if is_fresh(record, now_ms)})
            done.trimmed = {**self.trim_control(), **self.trim_outputs(now_ms, done.problems)}
        except redis.ResponseError as exc:  # a command refused (an ACL, say): housekeeping never stops a worker
            done.problems.append(str(exc))
        return done

    def server_time_ms(self) -> int:
        """Redis's clock: stream entry ids are stamped with it."""
        with unavailable():
            return redis_time_ms(self._redis.time())

    def records(self) -> dict[str, WorkerRecord]:
        with unavailable():
            return read_worker_records(self._redis.hgetall(self.keys.workers()))

    def forget_workers(self, records: dict[str, WorkerRecord], now_ms: int) -> list[str]:
        """Delete the records of workers silent for longer than ``dead_consumer_idle`` (and a claim timeout)."""
        horizon = now_ms - self._forget_after_ms
        gone = sorted(name for name, record in records.items() if record["updated_at_ms"] < horizon)
        if gone:
            with unavailable():
                self._redis.hdel(self.keys.workers(), *gone)
        return gone

    def reap_consumers(self, alive: set[str]) -> list[str]:
        """Remove dead consumers that own nothing, on every shard; ``alive`` names workers known to be alive."""
        removed: set[str] = set()
        min_idle_ms = self._settings.dead_consumer_idle * 1000
        with unavailable():
            for shard in self.keys.shard_ids():
                key = self.keys.requests(shard)
                try:
                    consumers = self._redis.xinfo_consumers(key, self.group)
                except redis.ResponseError:
                    continue  # no stream or no group on this shard yet: nothing to remove
                for consumer in consumers:
                    name = consumer["name"].decode()
                    if consumer["pending"] or consumer["idle"] < min_idle_ms or name in alive or name == self.consumer:
                        continue
                    if self._leave(keys=[key], args=[self.group, name]):  # re-checks pending, atomically
                        removed.add(name)
        return sorted(removed)

    def trim_outputs(self, now_ms: int, problems: list[str] | None = None) -> dict[str, int]:
        """Trim every shard's results, usage and dead-letter streams; entries deleted, by stream."""
        settings, trimmed = self._settings, {}
        for shard in self.keys.shard_ids():
            for key, max_age in ((self.keys.results(shard), settings.results_max_age),
                                 (self.keys.usage(shard), settings.usage_max_age),
                                 (self.keys.dead_letters(shard), settings.dead_letter_max_age)):
                try:
                    trimmed[key] = self.trim_stream(key, now_ms - max_age * 1000)
                except redis.ResponseError as exc:  # a stream that is something else, a command not allowed
                    if problems is None:
                        raise
                    problems.append(f"{key}: {exc}")
        return trimmed

    def trim_control(self) -> dict[str, int]:
        """Delete the control entries every group is done with (acknowledged, or delivered to a group that
        does not ack); never by age or length, since an entry no worker was handed yet must stay."""
        return {key: self.trim_stream(key, None) for key in map(self.keys.requests, self.keys.shard_ids())}

    def trim_stream(self, key: str, older_than_ms: int | None) -> int:
        """Delete entries older than ``older_than_ms`` (Redis time) that no consumer group still needs.

        ``None``: no age bound, only what the groups are done with; a stream without groups keeps everything.
        Computing the bound first and trimming after is safe: entries added or delivered meanwhile are newer.
        """
        bound = None if older_than_ms is None else (max(0, older_than_ms), 0)
        with unavailable():
            try:
                groups = self._redis.xinfo_groups(key)
            except redis.ResponseError as exc:
                if "no such key" in str(exc):
                    return 0
                raise
            for group in groups:
                needed = [next_id(group["last-delivered-id"])]
                oldest = self._redis.xpending(key, group["name"])["min"] if group["pending"] else None
                if oldest is not None:  # None also when all were acknowledged since XINFO answered
                    needed.append(parse_id(oldest))
                bound = min(needed) if bound is None else min(bound, *needed)
            if bound is None or bound <= (0, 1):
                return 0
            return int(self._redis.xtrim(key, minid=f"{bound[0]}-{bound[1]}", approximate=False))


def redis_time_ms(reply: Any) -> int:
    """A TIME reply, (seconds, microseconds), as milliseconds."""
    seconds, micros = reply
    return int(seconds) * 1000 + int(micros) // 1000


def is_fresh(record: WorkerRecord, now_ms: int) -> bool:
    """Whether a stats record missed fewer than three of its refreshes: its worker is alive."""
    return record["updated_at_ms"] >= now_ms - _MISSES * record["every_ms"] - _SKEW_MS


def record_state(record: WorkerRecord | None, now_ms: int) -> RecordState:
    return None if record is None else "fresh" if is_fresh(record, now_ms) else "stale"

