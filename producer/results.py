"""Read what workers publish: one result by request id, every result as it is published, and usage events.

Backends look a result up (``get_result``) or wait for it (``wait_for_result``, woken by pub/sub rather than
polling); dashboards follow the results streams (``follow_results``); analytics consume usage events through
a consumer group of their own (``UsageReader``), at their own pace and at least once; summaries read the
stored usage events without a group (``stored_usage``).

Every shard's stream is read on its own (``_read_each``): on a Redis Cluster the shards' streams sit in slots
of their own, and one read naming streams of several slots is refused. Readers see the shards merged.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import redis
from redis.client import PubSub
from redis.typing import KeyT, StreamIdT

from streamfold import contract
from streamfold.connection import connected, redis_errors, refresh_layout
from streamfold.contract import validate_request_id
from streamfold.errors import ContractError, RedisUnavailable, ResultTimeout
from streamfold.keys import Keys
from streamfold.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_BLOCK_MS = 500
# How often a wait for a result tries again while Redis cannot serve (a failover: about 3 s).
FAILOVER_POLL_S = 0.2

# One stream's entries as redis-py returns them: (entry id, fields); fields is None for a pending entry
# whose stream entry was deleted since.
_Entry = tuple[bytes, "dict[bytes, bytes] | None"]


def get_result(client: redis.Redis, keys: Keys, request_id: str) -> dict[str, Any] | None:
    """The result record of a request, or None while it has none (or after its TTL ran out)."""
    validate_request_id(request_id)
    with redis_errors(f"reading the result of {request_id}"):
        raw = cast("bytes | None", client.get(keys.result(request_id)))
    return None if raw is None else contract.decode_record(raw)


def wait_for_result(request_id: str, timeout: float, *, client: redis.Redis | None = None,
                    settings: Settings | None = None) -> dict[str, Any]:
    """Block until the request has a result and return it; raise ResultTimeout after ``timeout`` seconds.

    Subscribes to the request's notify channel *before* looking the result up, so a result published in
    between is either found by the lookup or announced on the channel: never missed, never polled for.
    ``settings`` (default: read from the environment now) gives the keys, and the client when none is given.
    A Redis that cannot serve for now (a failover) is waited out until the deadline, subscribing again to
    whichever primary serves next (on a cluster, after reading the slot layout again); RedisUnavailable only
    if none does by then.
    """
    validate_request_id(request_id)
    with connected(client, settings) as (client, settings):
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            try:
                return _wait(client, settings.keys, request_id, deadline, timeout)
            except RedisUnavailable:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(min(FAILOVER_POLL_S, max(0.0, deadline - time.monotonic())))
                refresh_layout(client)


def _wait(client: redis.Redis, keys: Keys, request_id: str, deadline: float, timeout: float) -> dict[str, Any]:
    pubsub: PubSub = client.pubsub()  # type: ignore[no-untyped-call]
    with redis_errors(f"waiting for the result of {request_id}"), pubsub:
        pubsub.subscribe(keys.notify(request_id))
        _until(pubsub, deadline, "subscribe")
        while True:
            record = get_result(client, keys, request_id)
            if record is not None:
                return record
            if time.monotonic() >= deadline:
                raise ResultTimeout(f"no result for {request_id} within {timeout:g} s")
            _until(pubsub, deadline, "message")


def _until(pubsub: PubSub, deadline: float, kind: str) -> None:
    """Wait on the subscription until a message of ``kind`` arrives or the deadline passes."""
    while (remaining := deadline - time.monotonic()) > 0:
        message = pubsub.get_message(timeout=remaining)
        if message is not None and message["type"] == kind:
            return


def follow_results(client: redis.Redis, keys: Keys, *, from_start: bool = False, follow: bool = False,
                   block_ms: int = DEFAULT_BLOCK_MS, count: int = 1000) -> Iterator[dict[str, Any]]:
    """Result records from every shard's results stream, in each shard's finish order.

    ``from_start`` begins with the oldest record still in the streams, otherwise with the first one
    published after this call. Without ``follow`` the iteration ends once the streams are drained; with it,
    it waits for more. ``block_ms`` must stay below the client's socket timeout.
    """
    with redis_errors("reading the results streams"):
        positions = {keys.results(shard): b"0-0" if from_start else _last_id(client, keys.results(shard))
                     for shard in keys.shard_ids()}
    return _read_results(client, positions, block_ms if follow else None, count)


def _read_results(client: redis.Redis, positions: dict[str, bytes], block_ms: int | None,
                  count: int) -> Iterator[dict[str, Any]]:
    turns = itertools.count()
    while True:
        with redis_errors("reading the results streams"):
            response = _read_each(client, positions, block_ms, next(turns),
                                  lambda target, streams, block: target.xread(streams, count=count, block=block))
        if not response:
            if block_ms is not None:
                continue
            return
        for name, entries in _per_stream(response):
            for entry_id, fields in entries:
                positions[name] = entry_id
                record = _decode(name, entry_id, fields)
                if record is not None:
                    yield record


def stored_usage(client: redis.Redis, keys: Keys, *, since_ms: int | None = None,
                 count: int = 1000) -> Iterator[dict[str, Any]]:
    """Every usage event still stored in every shard's usage stream, oldest first within each shard.

    Read with XRANGE, not through a consumer group, so a summary takes nothing from the groups analytics
    consume through. ``since_ms`` keeps the events whose stream entry id - the time Redis took when the
    finish published them, one clock for every worker - is at or after it (ms since the epoch).
    """
    for name in (keys.usage(shard) for shard in keys.shard_ids()):
        start = "-" if since_ms is None else f"{max(since_ms, 0)}-0"
        while True:
            with redis_errors("reading the usage streams"):
                entries = cast("list[_Entry]", client.xrange(name, min=start, count=count))
            for entry_id, fields in entries:
                event = _decode(name, entry_id, fields)
                if event is not None:
                    yield event
            if len(entries) < count:
                break
            start = "(" + entries[-1][0].decode()


@dataclass(frozen=True, slots=True)
class UsageEntry:
    """One usage event as delivered to a reader, with what it takes to acknowledge it."""

    stream: str
    entry_id: bytes
    event: dict[str, Any]


class UsageReader:
    """Usage events through a consumer group of its own on every shard's usage stream.

    Each group sees every event once, whatever other groups do, so each analytics consumer reads at its own
    pace. Delivery is at least once: events are acknowledged only after they were handled, and a reader
    that restarts under the same consumer name first gets back what it had been given but not acknowledged.
    """

    def __init__(self, client: redis.Redis, keys: Keys, *, group: str = "analytics", consumer: str = "reader",
                 from_start: bool = False, count: int = 100) -> None:
        self._client = client
        self._group = group
        self._consumer = consumer
        self._from_start = from_start
        self._count = count
        self._streams = [keys.usage(shard) for shard in keys.shard_ids()]
        self._turns = itertools.count()
        # Own pending entries are re-read from id 0 first; a stream leaves this map once it returns none.
        self._pending_from: dict[str, bytes] = {name: b"0" for name in self._streams}

    def create_groups(self) -> list[str]:
        """Create the group on every usage stream, at its start or its end; an existing group is kept as is
        (``from_start`` does not move it back). Returns the streams where the group existed already."""
        existing = []
        with redis_errors("creating usage consumer groups"):
            for name in self._streams:
                try:
                    self._client.xgroup_create(name, self._group, id="0" if self._from_start else "$", mkstream=True)
                except redis.ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise
                    existing.append(name)
        return existing

    def read(self, *, block_ms: int | None = None) -> list[UsageEntry]:
        """The next events for this consumer: its own unacknowledged ones first, then new ones.

        Blocks up to ``block_ms`` for new events when given (keep it below the socket timeout).
        """
        with redis_errors("reading usage events"):
            if self._pending_from:
                entries = self._read(self._pending_from, None, pending=True)
                if entries:
                    return entries
            return self._read(dict.fromkeys(self._streams, b">"), block_ms, pending=False)

    def ack(self, entries: Iterable[UsageEntry]) -> None:
        """Acknowledge handled events so the group never delivers them again."""
        by_stream: dict[str, list[bytes]] = {}
        for entry in entries:
            by_stream.setdefault(entry.stream, []).append(entry.entry_id)
        if not by_stream:
            return
        with redis_errors("acknowledging usage events"), self._client.pipeline(transaction=False) as pipe:
            for name, ids in by_stream.items():
                pipe.xack(name, self._group, *ids)
            pipe.execute()

    def consume(self, handle: Callable[[dict[str, Any]], None], *, follow: bool = False,
                block_ms: int = DEFAULT_BLOCK_MS) -> None:
        """Create the groups, then hand every event to ``handle`` and acknowledge it once handled.

        Returns when no event is left, unless ``follow``. If ``handle`` raises (or the process is
        interrupted), the events it already handled are acknowledged and the rest will be delivered again.
        """
        self.create_groups()
        while True:
            batch = self.read(block_ms=block_ms if follow else None)
            if not batch:
                if follow:
                    continue
                return
            handled: list[UsageEntry] = []
            try:
                for entry in batch:
                    handle(entry.event)
                    handled.append(entry)
            finally:
                self.ack(handled)
                for entry in batch[len(handled):]:
                    # Delivered but not handled: read again from this consumer's pending entries.
                    self._pending_from[entry.stream] = b"0"

    def _read(self, positions: Mapping[str, bytes], block_ms: int | None, *, pending: bool) -> list[UsageEntry]:
        response = _read_each(self._client, positions, block_ms, next(self._turns),
                              lambda target, streams, block: target.xreadgroup(
                                  self._group, self._consumer, streams, count=self._count, block=block))
        entries: list[UsageEntry] = []
        gone: list[UsageEntry] = []
        seen: set[str] = set()
        for name, stream_entries in _per_stream(response):
            seen.add(name)
            for entry_id, fields in stream_entries:
                if pending:
                    self._pending_from[name] = entry_id
                event = _decode(name, entry_id, fields)
                (entries if event is not None else gone).append(UsageEntry(name, entry_id, event or {}))
            if pending and not stream_entries:
                del self._pending_from[name]
        if pending:
            for name in set(positions) - seen:
                self._pending_from.pop(name, None)
        # Entries that can never be handled (deleted since, or not a record) would come back forever.
        self.ack(gone)
        return entries


def _last_id(client: redis.Redis, name: str) -> bytes:
    """The id of a stream's newest entry, so that following starts right after it ("0-0" if it has none).

    Resolving ``$`` once, rather than passing ``$`` to every read, keeps entries that arrive between two
    reads of another shard from being skipped.
    """
    last = cast("list[_Entry]", client.xrevrange(name, count=1))
    return last[0][0] if last else b"0-0"


# A read of some streams: on the client or on a pipeline, blocking up to the given ms (None: not at all).
_Read = Callable[[Any, "dict[KeyT, StreamIdT]", "int | None"], Any]


def _read_each(client: redis.Redis, positions: Mapping[str, bytes], block_ms: int | None, turn: int,
               read: _Read) -> list[Any]:
    """An XREAD-shaped answer for these streams (one per shard), each named by a read of its own.

    One stream is read as it is. Several are read without blocking, in one round trip (a cluster client
    splits it by node); only when none has anything does one of them - the ``turn``-th, so each gets its
    turn - block for a share of ``block_ms``. A wait longer than that share is no busier than one read, and
    every stream is looked at on every round, so none starves.
    """
    names = list(positions)
    if len(names) == 1:
        return list(_read_or_nothing(lambda: read(client, _streams(positions), block_ms),
                                     blocking=block_ms is not None) or [])
    with client.pipeline(transaction=False) as pipe:
        for name in names:
            read(pipe, _streams({name: positions[name]}), None)
        replies = [stream for reply in pipe.execute() for stream in (reply or [])]
    if replies or block_ms is None:
        return replies
    name = names[turn % len(names)]
    share = min(block_ms, max(5, block_ms // len(names)))
    return list(_read_or_nothing(lambda: read(client, _streams({name: positions[name]}), share), blocking=True) or [])


def _read_or_nothing(read: Callable[[], Any], *, blocking: bool) -> Any:
    # A blocking read that outlives the socket timeout is "no data"; a plain read that times out is a slow
    # or lost Redis, and must not look like a drained stream.
    try:
        return read()
    except redis.TimeoutError:
        if not blocking:
            raise
        return None


def _streams(positions: Mapping[str, bytes]) -> dict[KeyT, StreamIdT]:
    # redis-py types the streams argument as an invariant dict of unions; ours is one of those.
    return cast("dict[KeyT, StreamIdT]", dict(positions))


def _per_stream(response: Any) -> Iterator[tuple[str, list[_Entry]]]:
    """(stream name, entries) pairs of an XREAD/XREADGROUP answer (RESP2, as ``connect`` speaks it)."""
    for name, entries in response or ():
        yield (name.decode() if isinstance(name, bytes) else name), entries


def _decode(name: str, entry_id: bytes, fields: dict[bytes, bytes] | None) -> dict[str, Any] | None:
    """The record an output stream entry carries; None (and a warning) for one that is gone or malformed."""
    if not fields or contract.DATA not in fields:
        log.warning("skipping %s entry %r: no record in it", name, entry_id)
        return None
    try:
        return contract.decode_record(fields[contract.DATA])
    except ContractError as exc:
        log.warning("skipping %s entry %r: %s", name, entry_id, exc)
        return None
