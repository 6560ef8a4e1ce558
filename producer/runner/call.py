"""One call's life, from claim to end or error: the rules every runner of Streamfold's calls follows.

These are the only definition of what a call does, whoever runs it - the concurrent runner (``python -m
producer work``) or a plain ``rq worker`` running the job function, which runs one call on an event loop of
its own:

- **Claim before anything is published.** The claim sets ``keys.cancel(rid)`` to ``running`` unless it exists:
  ``first`` - this run owns the request; ``rerun`` - an earlier run claimed it and stopped (its runner died,
  or rq ran the job again); ``cancelled`` - ``producer.cancel`` got there first. A first run's claim and its
  start are one script in one batch (``RequestStream.claim_and_start``): a call's first round trip.
- **Attempts replace each other whole.** A retry after chunks were pushed starts attempt n+1; a re-run
  continues after the newest attempt in the stream, without starting the request again when its start is
  there, and does nothing when the stream already ended.
- **Retries** follow ``RetryPolicy`` (backoff with jitter, ``Retry-After`` honoured); when they run out, or
  the upstream refuses for good, the request fails with the upstream's status and message (``failure``).
- **Cancel** is noticed by ``CancelWatch`` within about ``CANCEL_CHECK_INTERVAL``: the call's task is
  interrupted wherever it waits - on the upstream, in a backoff, on Redis - the upstream connection is closed
  and the request fails with type ``cancelled``.
- A call that crashes fails its request ``producer_error`` and re-raises.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

import redis.asyncio

from producer.runner.publishing import RequestStream
from producer.upstream import RetryPolicy, UpstreamClient, failure
from streamfold.contract import ErrorInfo, Mode
from streamfold.errors import RedisUnavailable, UpstreamError
from streamfold.keys import Keys
from streamfold.logs import EventLog

log = logging.getLogger("streamfold.runner")

Outcome = Literal["ended", "failed", "cancelled", "skipped"]
CANCELLED = b"cancelled"
CANCEL_CHECK_INTERVAL = 0.1
CANCELLED_ERROR = ErrorInfo(message="request cancelled", type="cancelled", status=None, code=None)


def crash_error(exc: BaseException) -> ErrorInfo:
    """What a request fails with when the code carrying its call crashed or ran out of time."""
    return ErrorInfo(message=f"producer job failed: {type(exc).__name__}", type="producer_error", status=None,
                     code=None)


class Call:
    """Carries one request from its upstream onto its chunk stream; ``run`` returns how it ended.

    ``adopted``: the call was taken over from a runner that stopped, so a ``cancelled`` claim means the
    stopped runner had claimed it and never published the cancel: this run does. ``on_chunk(first, since)``
    (``since``: seconds since the call was made) and ``on_upstream_error(status)`` report to metrics. ``sleep`` is injectable so that tests decide time.
    """

    def __init__(self, request_id: str, stream: RequestStream, upstream: UpstreamClient | None,
                 params: Mapping[str, Any], *, meta: Mapping[str, Any], mode: Mode, api: str, policy: RetryPolicy,
                 claim_ttl: int, adopted: bool = False,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 on_chunk: Callable[[bool, float], None] | None = None,
                 on_upstream_error: Callable[[int | None], None] | None = None) -> None:
        self.request_id, self.stream, self.upstream, self.params = request_id, stream, upstream, params
        self.meta, self.mode, self.api, self.policy = meta, mode, api, policy
        self._claim_ttl, self._adopted = claim_ttl, adopted
        self._sleep = sleep
        self._on_chunk, self._on_upstream_error = on_chunk, on_upstream_error
        self._task: asyncio.Task[Any] | None = None
        self.created_at = time.monotonic()
        self._chunks = 0
        self._calling = False
        self.cancel_requested = False
        self.calls = 0
        self._log = EventLog(log)

    def request_cancel(self) -> None:
        """``cancel`` was called: interrupt the call wherever it waits (only while it still calls upstream).
        ``CancelWatch`` asks again each tick until the call took it: a cancel can be lost on Python 3.11
        (streamfold/tasks.py), and a lost one would let the call run on to its end."""
        if self._calling and self._task is not None:
            self.cancel_requested = True
            self._task.cancel("cancel requested")

    async def run(self) -> Outcome:
        self._task = asyncio.current_task()
        taken = await self.stream.claim_and_start(self.meta, self.mode, self.api, ttl=self._claim_ttl)
        if taken == "cancelled" and not self._adopted:
            return "skipped"  # producer.cancel published the request's failure itself
        try:
            attempt = 0 if taken == "first" else await self._open()
            if attempt is None:
                return "ended"  # the stream already ended: the run before finished the call
            if taken == "cancelled":
                await self.stream.fail(CANCELLED_ERROR)
                return "cancelled"
            return await self._attempts()
        except asyncio.CancelledError:
            self._calling = False  # no further cancel requests: this one is being handled
            if not self.cancel_requested:
                raise  # a drain, a hand-back or a timeout: the caller decides
            self._uncancel()
            await self.stream.fail(CANCELLED_ERROR)
            return "cancelled"
        except Exception as exc:
            await self._fail_after_crash(exc)
            raise
        finally:
            self._calling = False

    async def reject(self, error: ErrorInfo) -> Outcome:
        """Fail a request that cannot be called at all (an unknown upstream, a missing key)."""
        taken = await self.stream.claim_and_start(self.meta, self.mode, self.api, ttl=self._claim_ttl)
        if taken == "cancelled":
            return "skipped"
        if taken == "rerun":
            await self.stream.start(self.meta, self.mode, self.api)
        await self.stream.fail(error)
        return "failed"

    async def give_up(self, error: ErrorInfo) -> Outcome:
        """End an adopted call without calling its upstream again (its re-runs are used up): the request fails
        with ``error`` in its newest attempt, unless the run before already ended it."""
        last = await self.stream.last_entry()
        if last is None:
            await self.stream.start(self.meta, self.mode, self.api)
        elif last.kind in ("end", "error"):
            return "ended"
        else:
            self.stream.attempt = last.attempt
        await self.stream.fail(error)
        return "failed"

    async def _open(self) -> int | None:
        """Find where an earlier run left the request, starting it if that run never did; the attempt to go on
        with, or None when the earlier run already ended it."""
        last = await self.stream.last_entry()
        if last is None:
            await self.stream.start(self.meta, self.mode, self.api)
            return 0
        if last.kind in ("end", "error"):
            return None
        self.stream.follow(last.attempt)
        return self.stream.attempt

    async def _attempts(self) -> Outcome:
        self._calling = True
        retry = 0
        while True:
            try:
                return await self._call_once()
            except UpstreamError as exc:
                if self._on_upstream_error is not None:
                    self._on_upstream_error(exc.status)
                delay = self.policy.delay(retry, exc)
                if delay is None:
                    self._log.warning("upstream_failed", request_id=self.request_id, calls=self.calls,
                                      status=exc.status, error=str(exc))
                    await self.stream.fail(failure(exc))
                    return "failed"
                retry += 1
                self._log.warning("upstream_retry", request_id=self.request_id, status=exc.status, error=str(exc),
                                  retry=retry, of=self.policy.retries, delay_s=round(delay, 3))
                if self.stream.pushed:
                    self.stream.follow(self.stream.attempt)
                await self._sleep(delay)

    async def _call_once(self) -> Outcome:
        """One upstream call: push what it streams; raises UpstreamError when the call fails."""
        assert self.upstream is not None, "a call without an upstream is rejected, never run"
        self.calls += 1
        items = self.upstream.stream(self.params)
        try:
            async for item in items:
                if item.kind == "error":
                    self._calling = False
                    await self.stream.fail(item.error_body())
                    return "failed"
                self._chunks += 1
                if self._on_chunk is not None:
                    self._on_chunk(self._chunks == 1, time.monotonic() - self.created_at)
                await self.stream.push(item.data)
        finally:
            await items.aclose()  # type: ignore[attr-defined]
        self._calling = False
        await self.stream.end()
        return "ended"

    def _uncancel(self) -> None:
        """The cancel request was taken: clear every cancel of it (``request_cancel`` may have asked more than
        once before it landed). A hand-back meanwhile is not lost: it cancels until the task ends."""
        task = asyncio.current_task()
        while task is not None and task.uncancel() > 0:
            pass

    async def _fail_after_crash(self, exc: Exception) -> None:
        """Best effort: give a request whose call crashed its one failed result instead of a stall."""
        try:
            await self.stream.fail(crash_error(exc))
        except (RedisUnavailable, OSError):
            self._log.error("failure_not_published", request_id=self.request_id)


class CancelWatch:
    """Looks for cancels of every call in flight together: one MGET per shard per ``interval``, however many
    calls there are, instead of a read per call per chunk."""

    def __init__(self, client: redis.asyncio.Redis, keys: Keys, interval: float = CANCEL_CHECK_INTERVAL) -> None:
        self._client, self._keys, self._interval = client, keys, interval
        self._calls: dict[str, Call] = {}

    def watch(self, call: Call) -> None:
        self._calls[call.request_id] = call

    def forget(self, request_id: str) -> None:
        self._calls.pop(request_id, None)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            if self._calls:
                try:
                    await self.check()
                except (redis.RedisError, OSError):
                    pass  # Redis away: nobody can cancel meanwhile either; look again next time

    async def check(self) -> None:
        by_shard: dict[int, list[str]] = {}
        for request_id in self._calls:
            by_shard.setdefault(self._keys.shard(request_id), []).append(request_id)
        async with self._client.pipeline(transaction=False) as pipe:
            for request_ids in by_shard.values():
                # One MGET per shard (one slot), as a command: a cluster pipeline refuses its mget method.
                pipe.execute_command("MGET", *(self._keys.cancel(rid) for rid in request_ids))
            replies = await pipe.execute()
        for request_ids, values in zip(by_shard.values(), replies):
            for request_id, value in zip(request_ids, values):
                call = self._calls.get(request_id)
                if value == CANCELLED and call is not None:
                    call.request_cancel()
