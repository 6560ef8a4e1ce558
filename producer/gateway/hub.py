"""One reader for every chunk stream a gateway process follows: a blocking XREAD per shard, not per client.

A thousand followers each blocking on their own connection would cost Redis a thousand clients and a read per
chunk per follower. ``StreamHub`` keeps, per shard, one loop that names every followed stream of that shard
in a single blocking XREAD (all of them carry the shard's tag, so this holds on Redis Cluster too) and hands
each new entry to the followers of its stream.

A blocking read cannot be told about a stream it does not name. So each shard's read also watches a wake
stream of this process (``Keys.wake``, in the shard's slot); subscribing appends to it, and the read returns
at once to include the new stream. A subscriber that cannot keep up (its queue full) is dropped: its client
resumes from its last event, losing nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio

from streamfold.connection import cannot_serve
from streamfold.contract import Fields
from streamfold.keys import Keys
from streamfold.logs import EventLog
from streamfold.tasks import cancel_and_wait
from worker.broker import parse_id

log = EventLog(logging.getLogger("streamfold.gateway"))

Entry = tuple[bytes, Fields]  # as XREAD returns it
# Entries waiting for one subscriber before it counts as too slow and is dropped.
QUEUE_LIMIT = 10_000
# A wake stream only needs its newest entry; it lives on while its process does.
WAKE_MAXLEN, WAKE_TTL = 100, 3_600


class Overrun(Exception):
    """The subscriber fell too far behind and was dropped; its client should resume."""


@dataclass(eq=False)
class Subscription:
    """One follower's view of one chunk stream: ``get`` the next entries after ``cursor``."""

    request_id: str
    key: bytes
    cursor: str
    queue: asyncio.Queue[list[Entry] | None] = field(default_factory=lambda: asyncio.Queue(QUEUE_LIMIT))
    overrun: bool = False

    async def get(self) -> list[Entry]:
        """The next new entries, in order; Overrun if the hub dropped this subscriber."""
        batch = await self.queue.get()
        if batch is None:
            raise Overrun(f"the follower of {self.request_id} fell behind")
        return batch

    def deliver(self, entries: Sequence[Entry]) -> None:
        position = parse_id(self.cursor)
        fresh = [(entry_id, fields) for entry_id, fields in entries if parse_id(entry_id) > position]
        if not fresh or self.overrun:
            return
        self.cursor = fresh[-1][0].decode()
        try:
            self.queue.put_nowait(fresh)
        except asyncio.QueueFull:
            self.overrun = True
            self.queue.get_nowait()  # room for the marker that ends it
            self.queue.put_nowait(None)


class _Shard:
    """The streams one shard's loop reads: per stream, the position to read from and who gets what it reads."""

    def __init__(self, wake: bytes) -> None:
        self.wake = wake
        self.wake_cursor = b"$"
        self.streams: dict[bytes, str] = {}
        self.subscribers: dict[bytes, list[Subscription]] = {}

    def add(self, subscription: Subscription) -> None:
        key = subscription.key
        self.subscribers.setdefault(key, []).append(subscription)
        # A new follower may be behind the others: read the stream from the oldest position any follower needs
        # (the others skip what they already have).
        current = self.streams.get(key)
        if current is None or parse_id(subscription.cursor) < parse_id(current):
            self.streams[key] = subscription.cursor

    def remove(self, subscription: Subscription) -> None:
        followers = self.subscribers.get(subscription.key, [])
        if subscription in followers:
            followers.remove(subscription)
        if not followers:
            self.subscribers.pop(subscription.key, None)
            self.streams.pop(subscription.key, None)


class StreamHub:
    """Serves every subscription of this process from one reading loop per shard; ``start`` it on the event
    loop, ``close`` it at shutdown."""

    def __init__(self, client: redis.asyncio.Redis, keys: Keys, *, block_ms: int, count: int = 1000) -> None:
        self._client: Any = client
        self._keys = keys
        self._block_ms, self._count = block_ms, count
        name = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._shards = {shard: _Shard(keys.wake(shard, name).encode()) for shard in keys.shard_ids()}
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def followed(self) -> int:
        """Subscriptions being served now."""
        return sum(len(followers) for shard in self._shards.values() for followers in shard.subscribers.values())

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._serve(shard), name=f"hub-{number}")
                       for number, shard in self._shards.items()]

    async def close(self) -> None:
        await cancel_and_wait(*self._tasks)
        self._tasks = []

    async def subscribe(self, request_id: str, cursor: str = "0-0") -> Subscription:
        """Follow a request's chunk stream from after ``cursor``; ``unsubscribe`` when done."""
        subscription = Subscription(request_id, self._keys.chunks(request_id).encode(), cursor)
        shard = self._shards[self._keys.shard(request_id)]
        shard.add(subscription)
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.xadd(shard.wake, {b"w": b"1"}, maxlen=WAKE_MAXLEN, approximate=True)
            pipe.expire(shard.wake, WAKE_TTL)
            await pipe.execute()
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._shards[self._keys.shard(subscription.request_id)].remove(subscription)

    async def _serve(self, shard: _Shard) -> None:
        backoff = 0.05
        while True:
            try:
                await self._read_once(shard)
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a shard's loop must never end: its followers would wait for ever
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # Python 3.11's timeouts can turn a cancel that lands as a read times out into a
                    # TimeoutError, which redis-py raises as its own: the hub was closed meanwhile.
                    raise asyncio.CancelledError from exc
                level = logging.WARNING if isinstance(exc, redis.RedisError) and cannot_serve(exc) else logging.ERROR
                log.log(level, "hub_read_failed", error=f"{type(exc).__name__}: {exc}", retry_in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _read_once(self, shard: _Shard) -> None:
        streams: dict[bytes, Any] = {shard.wake: shard.wake_cursor, **shard.streams}
        reply = await self._client.xread(streams, count=self._count, block=self._block_ms)
        for key, entries in reply or ():
            if not entries:
                continue
            if key == shard.wake:
                shard.wake_cursor = entries[-1][0]
                continue
            if key in shard.streams:
                shard.streams[key] = entries[-1][0].decode()
            for subscription in list(shard.subscribers.get(key, ())):
                subscription.deliver(entries)
