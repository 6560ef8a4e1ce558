"""What the calls of one process share, and how a job's arguments become a running ``Call``.

One asynchronous Redis client, one ``Batcher`` (every call's envelopes in one pipeline), one ``CancelWatch``
(every call's cancel key in one read a tick) and one pooled upstream client per upstream name. The concurrent
runner keeps one ``Calls`` for its whole life; ``run_one`` makes one for a single job, which is how the rq
job function runs under a plain ``rq worker``. Either way a job's call is run by ``Calls.run``, so both paths
follow the same rules (producer/runner/call.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, TypedDict

import redis.asyncio

from producer.jobs import job_id
from producer.runner.call import Call, CancelWatch, Outcome
from producer.runner.publishing import Batcher, RequestStream
from producer.upstream import RetryPolicy, UpstreamClient
from streamfold.connection import connect_async
from streamfold.contract import ErrorInfo, Mode
from streamfold.errors import ConfigError
from streamfold.genai import provider_of
from streamfold.logs import EventLog
from streamfold.settings import Settings
from streamfold.tasks import cancel_and_wait

log = logging.getLogger("streamfold.runner")
# Connections one process's calls share: enough for the pipeline, the cancel watch and the commands of calls
# starting at the same moment; more would only queue inside Redis instead.
REDIS_CONNECTIONS = 64


class Summary(TypedDict):
    """What a job returns, and rq keeps as its result: never content, never a key."""

    request_id: str
    upstream: str
    outcome: Outcome
    calls: int


class Calls:
    """Runs calls for jobs; enter it (``async with``) to start its background tasks.

    ``hooks`` report to a runner's metrics; ``gate`` is the runner's lease check before each write;
    ``environ`` stands in for the environment in tests.
    """

    def __init__(self, settings: Settings, client: redis.asyncio.Redis, *, connections: int = 64,
                 gate: Callable[[], Awaitable[bool]] | None = None, hooks: CallHooks | None = None,
                 environ: Mapping[str, str] | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.settings, self.client, self.keys = settings, client, settings.keys
        self.hooks = hooks or CallHooks()
        self.batcher = Batcher(client, flush_s=settings.runner_flush_ms / 1000, batch=settings.runner_batch,
                               buffer_bytes=settings.runner_buffer_bytes, gate=gate,
                               on_redis_error=self.hooks.redis_error, wait_replicas=settings.redis_wait_replicas,
                               wait_timeout_ms=settings.redis_wait_timeout_ms)
        self.cancels = CancelWatch(client, self.keys)
        self._policy = RetryPolicy.from_settings(settings)
        self._connections, self._environ, self._sleep = connections, environ, sleep
        self._upstreams: dict[str, UpstreamClient] = {}
        self._exits = AsyncExitStack()
        self._tasks: list[asyncio.Task[None]] = []
        self._log = EventLog(log)

    async def __aenter__(self) -> Calls:
        self._tasks = [asyncio.create_task(self.batcher.run(), name="batcher"),
                       asyncio.create_task(self.cancels.run(), name="cancel-watch")]
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            if exc_type is None:
                # Bounded: a process told to stop must stop, even with a Redis that no longer answers. Every
                # call that ended waited for its end to be sent, so what could be left is never a call's end.
                async with asyncio.timeout(2 * self.settings.socket_timeout):
                    await self.batcher.drain()
        except TimeoutError:
            self._log.error("entries_unsent", count=self.batcher.buffered)
        finally:
            await cancel_and_wait(*self._tasks)
            await self._exits.aclose()

    def call(self, request_id: str, upstream: str, params: Mapping[str, Any], meta: Mapping[str, Any], *,
             adopted: bool = False) -> tuple[Call, ErrorInfo | None]:
        """The Call for a job's arguments, and the error it must be rejected with when its upstream cannot be
        called (an unknown name, a missing key)."""
        mode: Mode = "auto"
        problem, http, api, provider = None, None, "chat", None
        try:
            config = self.settings.upstream(upstream)
            provider = provider_of(config.base_url, config.provider)
            http, mode, api = self._upstream(upstream), config.mode, config.api
        except ConfigError as exc:
            self._log.error("upstream_not_callable", request_id=request_id, error=str(exc))
            problem = ErrorInfo(message=str(exc), type="config_error", status=None, code=None)
        model = params.get("model")
        # The job id is the request's producer token: a re-run of the same job may start it again.
        stream = RequestStream(self.batcher, self.keys, request_id, token=job_id(self.keys, request_id),
                               max_age=self.settings.stream_max_age, provider=provider,
                               request_model=model if isinstance(model, str) else None)
        call = Call(request_id, stream, http, params, meta=meta, mode=mode, api=api, policy=self._policy,
                    adopted=adopted, sleep=self._sleep,
                    claim_ttl=self.settings.job_timeout + self.settings.cancel_ttl,
                    on_chunk=self.hooks.chunk, on_upstream_error=self.hooks.upstream_error)
        return call, problem

    async def run(self, call: Call, problem: ErrorInfo | None = None) -> Outcome:
        """Run ``call`` to its end, looking out for its cancel meanwhile."""
        if problem is not None:
            return await call.reject(problem)
        self.cancels.watch(call)
        try:
            return await call.run()
        finally:
            self.cancels.forget(call.request_id)

    def _upstream(self, name: str) -> UpstreamClient:
        """One pooled client per upstream, shared by every call to it; ConfigError when it cannot be built."""
        client = self._upstreams.get(name)
        if client is None:
            client = UpstreamClient.from_settings(self.settings, self.settings.upstream(name), environ=self._environ,
                                                  connections=self._connections)
            self._exits.push_async_callback(client.aclose)
            self._upstreams[name] = client
        return client


class CallHooks:
    """What calls report as they go; a runner's metrics override these, a single job keeps them silent."""

    def chunk(self, first: bool, since: float) -> None:
        """A chunk arrived from the upstream, ``since`` seconds after its call was made; ``first`` for the
        call's first."""

    def upstream_error(self, status: int | None) -> None:
        """An upstream call failed, with this status (None: no answer)."""

    def redis_error(self) -> None:
        """A batch could not be sent for want of Redis."""


async def run_one(settings: Settings, request_id: str, upstream: str, params: Mapping[str, Any],
                  meta: Mapping[str, Any]) -> Summary:
    """Run one job's call in a process of its own (a plain ``rq worker``); returns the job's summary."""
    client = connect_async(settings)  # one call: the default pool is ample
    try:
        async with Calls(settings, client, connections=1) as calls:
            call, problem = calls.call(request_id, upstream, params, meta)
            outcome = await calls.run(call, problem)
    finally:
        await client.aclose()
    return Summary(request_id=request_id, upstream=upstream, outcome=outcome, calls=call.calls)
