"""Publishing from many calls at once: one shared batch of commands, flushed on size or on a short timer.

Every call in a runner process hands its envelopes to one ``Batcher``. Entries wait at most ``flush_s``
(a couple of milliseconds) or until ``batch`` of them are waiting, then go to Redis in one round trip with
everything the other calls pushed meanwhile, so a thousand calls cost a few hundred round trips a second,
not a round trip per chunk. One batch is in flight at a time and batches leave in the order entries were
handed in, so each request's entries reach its stream in the order they were pushed.

A batch is written as one packed write on a connection of the Batcher's own, and its replies read back in
order: no redis-py pipeline object per batch, whose bookkeeping cost more than the commands (BENCHMARKS.md,
"Call runner"). A client without one connection pool (a cluster's) gets its commands through its own
pipeline, which sends each to the node that holds its key. Scripts go as EVALSHA and are loaded only when
Redis answers that it lacks one (NOSCRIPT), then the commands that needed it are sent again.

When Redis is slow or away, a batch that failed is sent again, whole and first, after a backoff: nothing is
dropped and nothing overtakes it. An entry sent twice is harmless - workers drop a repeated (attempt, seq),
ignore entries after the end, and a start written again with the same token is the same start. While
batches cannot leave, pushes wait once ``buffer_bytes`` of chunks are held (backpressure: the calls stop
reading their upstreams), so a runner's memory stays bounded. Starts and closes never wait for room, so a
call can always finish what it began.

``RequestStream`` is one request's view of it: the attempt and seq bookkeeping of ``producer.Publisher``,
with the same envelopes (streamfold/contract.py) and the same start script.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

import redis
import redis.asyncio
from hiredis import pack_command
from redis.asyncio.sentinel import SentinelManagedConnection
from redis.exceptions import NoScriptError

from producer.publisher import START_SCRIPT, check_started, now_ms, start_arguments
from streamfold import contract
from streamfold.connection import cannot_serve
from streamfold.contract import Envelope, ErrorInfo, Fields, Format, Mode, decode_envelope
from streamfold.errors import RedisRefused
from streamfold.keys import Keys
from streamfold.logs import EventLog

log = logging.getLogger("streamfold.runner")

# A call's first step as one script: claim the request (its cancel key, the last KEYS, set to "running" for
# ARGV[1] seconds unless it exists) and, only when this run is the first to, open it as start.lua does with the
# ARGV after the first. start.lua's own text, not a copy, so the two cannot drift. Returns {1, start.lua's
# answer} after opening, or {0, the cancel key's value}. Every key carries the request's shard tag.
CLAIM_AND_START_SCRIPT = f"""
local function start()
{START_SCRIPT}
end
if redis.call('SET', KEYS[#KEYS], 'running', 'NX', 'EX', ARGV[1]) then
  table.remove(ARGV, 1)
  return {{1, start()}}
end
return {{0, redis.call('GET', KEYS[#KEYS])}}
"""
# A call's end or error, preceded by its start again when the start is gone: its owner key, which start.lua
# writes in the same step as the start envelope and the control entry, is missing. Only a failover that lost
# writes the old primary had acknowledged removes a start this way; without the control entry no worker
# would ever claim the request, and it would never end. Sent as EVAL, not EVALSHA: a primary just promoted
# may lack the script, and reloading it would send the start again only after the end.
RESTART_IF_LOST_SCRIPT = f"""
local function start()
{START_SCRIPT}
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return start()
end
return -1
"""
RUNNING = b"running"
Claim = Literal["first", "rerun", "cancelled"]

Command = tuple[Any, ...]  # one Redis command: its name, then its arguments


T = TypeVar("T")


def backoff_s(failures: int) -> float:
    """How long to wait after ``failures`` sends in a row found Redis away: 50 ms doubling to 2 s, jittered."""
    return float(min(2.0, 0.05 * 2 ** min(failures, 6)) * random.uniform(0.5, 1.0))


async def patiently(command: Callable[[], Awaitable[T]], what: str) -> T:
    """Run a call's own Redis command (a claim, a read), waiting out a Redis that cannot serve for now rather
    than failing the call: a Redis outage must not cost a call its upstream attempt or its result."""
    failures = 0
    while True:
        try:
            return await command()
        except redis.RedisError as exc:
            if not cannot_serve(exc):
                raise
            failures += 1
            delay = backoff_s(failures)
            EventLog(log).warning("redis_unavailable", doing=what, error=f"{type(exc).__name__}: {exc}",
                                  retry_in_s=round(delay, 3))
            await asyncio.sleep(delay)


class Discarded(Exception):
    """An entry dropped unsent: the runner lost its lease, and with it the calls the entry was for."""


@dataclass(slots=True)
class _Entry:
    commands: Sequence[Command]
    size: int
    reply: asyncio.Future[Any] | None


class Batcher:
    """The shared publishing batch of one process; ``run`` is its flushing task.

    ``gate`` is awaited before each batch leaves: a runner passes its lease check, so that a runner whose
    calls were taken over by a peer never writes for them again - on False, everything buffered is dropped
    and whoever waits for a reply gets ``Discarded``. ``on_redis_error`` counts failed sends.

    ``wait_replicas``: every batch ends with ``WAIT wait_replicas wait_timeout_ms`` on the same connection, and
    counts as sent only once that many replicas hold it; otherwise it is sent again, like a batch that met
    no Redis. A failover then loses no write a call went on from: not a start, not a chunk, not an end.
    """

    def __init__(self, client: redis.asyncio.Redis, *, flush_s: float = 0.002, batch: int = 1000,
                 buffer_bytes: int = 64 * 2**20, gate: Callable[[], Awaitable[bool]] | None = None,
                 on_redis_error: Callable[[], None] | None = None, wait_replicas: int = 0,
                 wait_timeout_ms: int = 500) -> None:
        self.client = client
        self._wait = ("WAIT", wait_replicas, wait_timeout_ms) if wait_replicas else None
        self._flush_s, self._batch, self._limit = flush_s, batch, buffer_bytes
        self._gate, self._on_redis_error = gate, on_redis_error
        self._entries: deque[_Entry] = deque()
        self._bytes = 0
        self._waiting = asyncio.Event()   # something to send
        self._due = asyncio.Event()       # send now: a batch is full, or someone waits for a reply
        self._room = asyncio.Event()      # the buffer fell below its limit
        self._room.set()
        self._replies = 0  # entries buffered whose sender waits for the reply
        self._scripts: dict[str, str] = {}  # sha -> text, for loading what Redis lacks
        self._start = self.script(START_SCRIPT)
        self._claim_and_start = self.script(CLAIM_AND_START_SCRIPT)
        self._connection: redis.asyncio.connection.AbstractConnection | None = None
        self._timeout: float | None = None
        self._log = EventLog(log)
        self.flushes = 0

    @property
    def buffered(self) -> int:
        return len(self._entries)

    def script(self, text: str) -> str:
        """Make a Lua script callable in batches (``EVALSHA sha``); returns its sha."""
        sha = hashlib.sha1(text.encode()).hexdigest()
        self._scripts[sha] = text
        return sha

    async def send(self, commands: Sequence[Command], *, size: int = 0, reply: bool = False) -> Any:
        """Hand an entry (its commands) over; with ``reply``, wait until it was sent and return the reply of its
        last command (RedisRefused when Redis refused any). Entries with a ``size`` wait for room first."""
        if size:
            while self._bytes >= self._limit:
                self._room.clear()
                await self._room.wait()
        future = asyncio.get_running_loop().create_future() if reply else None
        self._entries.append(_Entry(commands, size, future))
        self._bytes += size
        self._replies += future is not None
        self._waiting.set()
        if reply or len(self._entries) >= self._batch:
            self._due.set()
        return await future if future is not None else None

    async def start(self, keys: list[str], args: list[Any]) -> Any:
        """Run producer/lua/start.lua in the next batch and return its answer."""
        return await self.send((("EVALSHA", self._start, len(keys), *keys, *args),), reply=True)

    async def claim_and_start(self, cancel_key: str, ttl: int, keys: list[str], args: list[Any]) -> Any:
        """Run ``CLAIM_AND_START_SCRIPT`` in the next batch and return its answer."""
        return await self.send((("EVALSHA", self._claim_and_start, len(keys) + 1, *keys, cancel_key, ttl, *args),),
                               reply=True)

    async def drain(self) -> None:
        """Wait until everything handed over so far was sent."""
        if self._entries:
            await self.send((), reply=True)

    async def run(self) -> None:
        """Send batches until cancelled; a batch that fails for want of Redis is sent again after a backoff."""
        try:
            await self._flush_forever()
        finally:
            if self._connection is not None:
                await self._connection.disconnect()
                self._connection = None

    async def _flush_forever(self) -> None:
        failures = 0
        while True:
            await self._waiting.wait()
            if not self._due.is_set():
                # A timer that sets ``_due``, rather than wait_for: this runs at every flush, and wait_for
                # makes a task each time.
                timer = asyncio.get_running_loop().call_later(self._flush_s, self._due.set)
                await self._due.wait()
                timer.cancel()
            batch = list(itertools.islice(self._entries, self._batch))
            try:
                if self._gate is not None and not await self._gate():
                    self._discard()
                    continue
                replies = await self._execute(batch)
            except redis.RedisError as exc:
                # Whatever Redis answered - away, failing over, refusing the whole batch - the batch waits and
                # goes again: the calls' entries must not be dropped, and a refusal may be put right meanwhile.
                failures += 1
                if self._on_redis_error is not None:
                    self._on_redis_error()
                delay = backoff_s(failures)
                event = "redis_unavailable" if cannot_serve(exc) else "redis_refused"
                self._log.warning(event, error=f"{type(exc).__name__}: {exc}", buffered=self.buffered,
                                  retry_in_s=round(delay, 3))
                await asyncio.sleep(delay)
                continue
            failures = 0
            self.flushes += 1
            self._settle(batch, replies)

    async def _execute(self, batch: list[_Entry]) -> list[list[Any]]:
        """Every entry's commands in one round trip; each entry's replies, errors among them."""
        commands = [command for entry in batch for command in entry.commands]
        flat = await self._round_trip(commands)
        lacking = [at for at, reply in enumerate(flat) if isinstance(reply, NoScriptError)]
        if lacking:
            # Only starts are scripts, and nothing of a request follows its start before the start's reply:
            # sending them again after the rest of the batch reorders nothing within a request.
            for sha in {commands[at][1] for at in lacking}:
                await self.client.script_load(self._scripts[sha])
            for at, reply in zip(lacking, await self._round_trip([commands[at] for at in lacking])):
                flat[at] = reply
        replies, at = [], 0
        for entry in batch:
            replies.append(flat[at:at + len(entry.commands)])
            at += len(entry.commands)
        return replies

    async def _round_trip(self, commands: list[Command]) -> list[Any]:
        if not commands:
            return []
        if self._wait is None or getattr(self.client, "connection_pool", None) is None:
            return await self._send(commands)
        # WAIT counts the replicas holding this connection's writes so far: the batch's own connection's.
        *replies, confirmed = await self._send([*commands, self._wait])
        if not isinstance(confirmed, int) or confirmed < self._wait[1]:
            raise redis.TimeoutError(f"{confirmed} of {self._wait[1]} replicas confirmed a batch within "
                                     f"{self._wait[2]} ms (STREAMFOLD_REDIS_WAIT_REPLICAS)")
        return replies

    async def _send(self, commands: list[Command]) -> list[Any]:
        pool = getattr(self.client, "connection_pool", None)
        if pool is None:
            async with self.client.pipeline(transaction=False) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                return await pipe.execute(raise_on_error=False)
        if self._connection is None:
            # A connection of the Batcher's own, made as the pool makes its connections but without a socket
            # timeout: the whole round trip gets one timeout instead of a task per write and one per reply.
            self._timeout = pool.connection_kwargs.get("socket_timeout")
            self._connection = pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": None})
        connection = self._connection
        try:
            async with asyncio.timeout(self._timeout):
                if not connection.is_connected and isinstance(connection, SentinelManagedConnection):
                    # A Sentinel-managed connection asks the Sentinels for the primary only in connect(); the
                    # connect that sending does by itself would go to its last address, or, never connected,
                    # to localhost.
                    await connection.connect()  # type: ignore[no-untyped-call]
                await connection.send_packed_command(b"".join(map(pack_command, commands)))
                replies: list[Any] = []
                for _ in commands:
                    try:
                        replies.append(await connection.read_response())
                    except redis.ResponseError as exc:  # a refusal of one command: the replies after it still come
                        replies.append(exc)
                return replies
        except BaseException as exc:
            # Replies left unread would be taken for the next batch's: start again on a new connection.
            await connection.disconnect(nowait=True)
            if isinstance(exc, TimeoutError):
                raise redis.TimeoutError(f"Redis did not answer a batch within {self._timeout} s") from exc
            raise

    def _settle(self, batch: list[_Entry], replies: list[list[Any]]) -> None:
        for entry, reply in zip(batch, replies):
            self._entries.popleft()
            self._bytes -= entry.size
            error = next((part for part in reply if isinstance(part, Exception)), None)
            self._replies -= entry.reply is not None
            if entry.reply is not None and not entry.reply.done():
                if error is not None:
                    entry.reply.set_exception(RedisRefused(f"Redis refused a runner's write: {error}"))
                else:
                    entry.reply.set_result(reply[-1] if reply else None)
            elif error is not None:
                self._log.error("entry_refused", error=str(error))
        if not self._entries:
            self._waiting.clear()
            self._due.clear()
        elif len(self._entries) < self._batch and not self._replies:
            self._due.clear()
        if self._bytes < self._limit:
            self._room.set()

    def _discard(self) -> None:
        for entry in self._entries:
            if entry.reply is not None and not entry.reply.done():
                entry.reply.set_exception(Discarded("this runner no longer holds its calls; nothing was sent"))
        self._entries.clear()
        self._bytes = self._replies = 0
        self._waiting.clear()
        self._due.clear()
        self._room.set()


class RequestStream:
    """One request's envelopes through the shared Batcher: start, chunks of the current attempt, end or error.

    The request id belongs to ``token`` (the job's), so a re-run of the same job may start it again and no
    other producer can. ``max_age`` is the chunk stream's safety expiry, as the Publisher sets it.
    ``provider`` and ``request_model`` name the call in its usage event (and price it).
    """

    def __init__(self, batcher: Batcher, keys: Keys, request_id: str, *, token: str, max_age: int,
                 provider: str | None = None, request_model: str | None = None) -> None:
        self.request_id = request_id
        self.key = keys.chunks(request_id)
        self.attempt = 0
        self.pushed = 0  # chunks of the current attempt
        self._batcher, self._keys, self._token, self._max_age = batcher, keys, token, max_age
        self._provider, self._request_model = provider, request_model
        self._started: tuple[list[str], list[Any]] | None = None  # the start's script arguments, once sent

    async def start(self, meta: Mapping[str, Any], mode: Mode, api: str) -> None:
        """Open the request (start envelope and control entry, one script); ContractError when another
        producer owns the request id. ``api`` is the upstream's wire API: the stream's format."""
        keys, args = self._start_arguments(meta, mode, api)
        check_started(self.request_id, await self._batcher.start(keys, args))
        self._started = keys, args

    async def claim_and_start(self, meta: Mapping[str, Any], mode: Mode, api: str, *, ttl: int) -> Claim:
        """Claim the request for ``ttl`` seconds (its cancel key set to ``running`` unless it exists) and, when
        this is its first run, open it as ``start`` does: one script, in the next batch. ``first``: claimed
        and opened; ``rerun``: an earlier run claimed it; ``cancelled``: its cancel got there first. Neither
        of the last two opened anything."""
        keys, args = self._start_arguments(meta, mode, api)
        claimed, answer = await self._batcher.claim_and_start(self._keys.cancel(self.request_id), ttl, keys, args)
        if claimed:
            check_started(self.request_id, answer)
            self._started = keys, args
            return "first"
        return "rerun" if answer == RUNNING else "cancelled"

    def _start_arguments(self, meta: Mapping[str, Any], mode: Mode, api: str) -> tuple[list[str], list[Any]]:
        return start_arguments(self._keys, self.request_id, meta, mode, token=self._token, max_age=self._max_age,
                               format=cast(Format, api), provider=self._provider, request_model=self._request_model)

    async def last_entry(self) -> Envelope | None:
        """The newest envelope in the request's stream, None when it has none: where a re-run picks up."""
        await self._batcher.drain()
        newest = await patiently(lambda: self._batcher.client.xrevrange(self.key, count=1), "reading a stream")
        return decode_envelope(cast(Fields, newest[0][1])) if newest else None

    def follow(self, attempt: int) -> None:
        """Continue after ``attempt``: the next chunk starts attempt + 1, which replaces every earlier one."""
        self.attempt, self.pushed = attempt + 1, 0

    async def push(self, raw: bytes) -> None:
        fields = contract.encode_chunk(raw, seq=self.pushed, attempt=self.attempt, ts_ms=now_ms())
        self.pushed += 1
        await self._batcher.send((_xadd(self.key, fields),), size=len(raw) + 64)

    async def end(self) -> None:
        await self._close(contract.encode_end(attempt=self.attempt, ts_ms=now_ms(), chunks=self.pushed))

    async def fail(self, error: str | Mapping[str, Any] | BaseException) -> None:
        info = contract.error_info(error)
        await self._close(contract.encode_error(info, attempt=self.attempt, ts_ms=now_ms()))

    async def _close(self, fields: dict[str, bytes]) -> None:
        """The end or error envelope, and the stream's safety expiry; returns once both are in Redis. A start
        this run sent and a failover lost is sent again first (``RESTART_IF_LOST_SCRIPT``)."""
        restart: tuple[Command, ...] = ()
        if self._started is not None:
            keys, args = self._started
            restart = (("EVAL", RESTART_IF_LOST_SCRIPT, len(keys), *keys, *args),)
        await self._batcher.send((*restart, _xadd(self.key, fields), ("EXPIRE", self.key, self._max_age, "NX")),
                                 reply=True)


def _xadd(key: str, fields: dict[str, bytes]) -> Command:
    return ("XADD", key, "*", *itertools.chain.from_iterable(fields.items()))
