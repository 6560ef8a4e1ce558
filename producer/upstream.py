"""The HTTP side of a call: one streamed call to an upstream, in whichever API it speaks (producer/apis.py).

``UpstreamClient.stream`` POSTs the call and yields each SSE event as received - a chunk, or an error event's
body - until the stream ends. Everything that goes wrong on the way is translated here, once, into
``UpstreamError`` with the upstream's status and message and whether a retry can help; ``RetryPolicy`` then
decides how long to wait before the next try, or that there is none. The client is asynchronous: a runner
process holds hundreds of calls at once on one event loop, over one connection pool.

API keys: the client holds its key only in memory, and every message it produces (error texts that end up
in results, log lines) passes through ``redact`` first, in case an upstream echoes the key back.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any

import httpx
from httpx_sse import EventSource, SSEError

from producer.apis import APIS, Api, error_kind, error_message, retryable_status
from streamfold.capture import CapturedItem
from streamfold.contract import ErrorInfo
from streamfold.errors import ConfigError, UpstreamError
from streamfold.settings import Settings, Upstream

REDACTED = "[redacted]"


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret replaced by ``[redacted]``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


class RedactingFilter(logging.Filter):
    """A logging filter that removes secrets from every record it sees; put it on a handler."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = tuple(secret for secret in secrets if secret)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message, self.secrets)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[1] is not None:
            # Render the traceback now, redacted, so the handler prints this text instead of formatting it again.
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info), self.secrets)
            record.exc_info = None
        return True


def api_key_of(upstream: Upstream, environ: Mapping[str, str] | None = None) -> str | None:
    """The upstream's API key from the environment variable it names; None when it names none."""
    if upstream.api_key_env is None:
        return None
    key = (os.environ if environ is None else environ).get(upstream.api_key_env)
    if not key:
        raise ConfigError(f"environment variable {upstream.api_key_env} (the upstream's api_key_env) is not set")
    return key


def configured_secrets(settings: Settings, environ: Mapping[str, str] | None = None) -> list[str]:
    """Every API key the configured upstreams would use: what a log must never show."""
    environ = os.environ if environ is None else environ
    return [environ[up.api_key_env] for up in settings.upstreams.values()
            if up.api_key_env and environ.get(up.api_key_env)]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how long to wait before trying a failed upstream call again.

    Exponential backoff with jitter from ``backoff`` seconds, capped at ``backoff_max``. An upstream's
    Retry-After is honoured as given; one longer than ``backoff_max`` ends the retries, since retrying sooner
    than the upstream asked would only be refused again, and waiting longer would hold a job runner idle.
    """

    retries: int = 3
    backoff: float = 0.5
    backoff_max: float = 30.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(settings.upstream_retries, settings.upstream_backoff, settings.upstream_backoff_max)

    def delay(self, retry: int, error: UpstreamError, jitter: Callable[[], float] = random.random) -> float | None:
        """Seconds to wait before retry number ``retry`` (from 0) after ``error``; None: give up."""
        if not error.retryable or retry >= self.retries:
            return None
        if error.retry_after is not None:
            return float(error.retry_after) if error.retry_after <= self.backoff_max else None
        ceiling = min(self.backoff * 2.0 ** retry, self.backoff_max)
        # Half fixed, half random: spreads out runners that failed together without ever retrying at once.
        return ceiling / 2 + jitter() * ceiling / 2


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds an upstream asked to wait: ``retry-after-ms``, or ``Retry-After`` as seconds or an HTTP date."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(float(millis) / 1000, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(when - (time.time() if now is None else now), 0.0)


def failure(error: UpstreamError) -> ErrorInfo:
    """The error a request fails with after ``error``: the upstream's own message and status, and a type that
    reads the same whichever provider it came from."""
    return ErrorInfo(message=str(error), type=error_kind(error.status, error.retryable), status=error.status,
                     code=None)


class UpstreamClient:
    """Streams calls from one upstream over pooled ``httpx.AsyncClient``s; close it (``aclose``) when done.

    ``transport`` replaces the network (tests pass an ``httpx.MockTransport``). ``connections`` is how many
    calls may stream at once, which a runner sets to its concurrency: they are spread over one pool per
    ``POOL_SIZE`` of them, since httpcore looks through every connection of a pool whenever a request
    starts or ends, and a thousand connections in one pool made that the runner's largest cost.
    """

    POOL_SIZE = 64

    def __init__(self, base_url: str, *, api: Api = APIS["chat"], api_key: str | None = None,
                 params: Mapping[str, Any] | None = None, connect_timeout: float = 10.0, read_timeout: float = 60.0,
                 transport: httpx.AsyncBaseTransport | None = None, connections: int = POOL_SIZE) -> None:
        url = httpx.URL(base_url)
        self.api = api
        self._api_key = api_key
        self._defaults = dict(params or {})
        self._secrets = (api_key,) if api_key else ()
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=min(connections, self.POOL_SIZE))
        # httpx drops a base URL's query when it joins a path onto it; send it as client-wide params instead.
        self._pools = [httpx.AsyncClient(base_url=url.copy_with(query=None), params=url.params, transport=transport,
                                         timeout=httpx.Timeout(read_timeout, connect=connect_timeout, pool=None),
                                         limits=limits)
                       for _ in range(max(1, math.ceil(connections / self.POOL_SIZE)))]
        self._turn = itertools.cycle(self._pools)

    @classmethod
    def from_settings(cls, settings: Settings, upstream: Upstream, *, environ: Mapping[str, str] | None = None,
                      transport: httpx.AsyncBaseTransport | None = None,
                      connections: int = POOL_SIZE) -> UpstreamClient:
        return cls(upstream.base_url, api=APIS[upstream.api], api_key=api_key_of(upstream, environ),
                   params=upstream.params, connect_timeout=settings.upstream_connect_timeout,
                   read_timeout=settings.upstream_read_timeout, transport=transport, connections=connections)

    async def stream(self, params: Mapping[str, Any]) -> AsyncIterator[CapturedItem]:
        """Yield each SSE event of one streamed call with ``params`` (over the upstream's defaults): ``chunk``
        items with the data byte for byte, or one ``error`` item for an error event. Stops at the stream's end.

        Raises UpstreamError for an error status, a network failure or timeout (before or during the stream),
        or an answer that is not an event stream. Closing the iterator closes the connection.
        """
        request = self.api.request(params, self._defaults, self._api_key)
        try:
            async with next(self._turn).stream("POST", request.path, json=request.body, headers=request.headers,
                                           params=request.params) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise self._status_error(response)
                async for event in EventSource(response).aiter_sse():
                    item = self.api.item(event.event.encode(), event.data.encode())
                    if item.kind == "done":
                        return
                    if item.data or item.kind == "error":
                        yield item
                    if item.kind == "error":
                        return
        except SSEError as exc:  # an httpx.TransportError too, but no retry makes it an event stream
            raise UpstreamError(self.redact(f"upstream did not answer with an event stream: {exc}")) from exc
        except httpx.TimeoutException as exc:
            raise UpstreamError(self.redact(f"upstream timed out: {type(exc).__name__} {exc}".strip()),
                                retryable=True) from exc
        except httpx.TransportError as exc:
            raise UpstreamError(self.redact(f"upstream connection failed: {type(exc).__name__} {exc}".strip()),
                                retryable=True) from exc
        except httpx.HTTPError as exc:  # undecodable bodies, redirect loops: the upstream's fault, not ours
            raise UpstreamError(self.redact(f"upstream call failed: {type(exc).__name__} {exc}".strip())) from exc

    def redact(self, text: str) -> str:
        return redact(text, self._secrets)

    def _status_error(self, response: httpx.Response) -> UpstreamError:
        status = response.status_code
        message = error_message(response.content, response.reason_phrase or f"HTTP {status}")
        return UpstreamError(self.redact(message), status=status, retryable=retryable_status(status),
                             retry_after=parse_retry_after(response.headers))

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()

    async def __aenter__(self) -> UpstreamClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
