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

import asyncio
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp
import orjson

from producer.apis import APIS, Api, Request, error_kind, error_message, retryable_status
from streamfold.capture import CapturedItem, SSEDecoder
from streamfold.contract import ErrorInfo
from streamfold.errors import ConfigError, UpstreamError
from streamfold.settings import Settings, Upstream

REDACTED = "[redacted]"
JSON = {"Content-Type": "application/json"}
BODY_END_WAIT_S = 0.05  # longest the end of a call waits for its body's end after the end marker


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


def described(exc: BaseException) -> str:
    """An exception as a message says it: its type and text, and what its OS error number means (a refused
    connection reads "Connection refused", whichever event loop wrote the text)."""
    text = f"{type(exc).__name__} {exc}".strip()
    number = getattr(exc, "errno", None)
    return f"{text} ({os.strerror(number)})" if isinstance(number, int) and number > 0 else text


def failure(error: UpstreamError) -> ErrorInfo:
    """The error a request fails with after ``error``: the upstream's own message and status, and a type that
    reads the same whichever provider it came from."""
    return ErrorInfo(message=str(error), type=error_kind(error.status, error.retryable), status=error.status,
                     code=None)


class UpstreamClient:
    """Streams calls from one upstream over one pooled ``aiohttp.ClientSession``; close it (``aclose``) when done.

    ``connections`` is how many calls may stream at once, which a runner sets to its concurrency: the pool
    holds that many connections, so that a call never waits for one. aiohttp rather than httpx: reading a
    chunk through httpx's asynchronous stack (a timeout scope per read, the pure-Python HTTP parser) cost about
    100 µs more than through aiohttp's C parser (BENCHMARKS.md, "Call runner"). The session is made on the
    first call, on the event loop that runs the calls.
    """

    def __init__(self, base_url: str, *, api: Api = APIS["chat"], api_key: str | None = None,
                 params: Mapping[str, Any] | None = None, connect_timeout: float = 10.0, read_timeout: float = 60.0,
                 connections: int = 64) -> None:
        url = urlsplit(base_url)
        self.api = api
        self._api_key = api_key
        self._defaults = dict(params or {})
        self._secrets = (api_key,) if api_key else ()
        # The base URL's query (an Azure api-version, say) goes with every call, after the path is joined on.
        self._base = urlunsplit((url.scheme, url.netloc, url.path.rstrip("/"), "", ""))
        self._query = parse_qsl(url.query, keep_blank_values=True)
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_read=read_timeout)
        self._connections = max(1, connections)
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_settings(cls, settings: Settings, upstream: Upstream, *, environ: Mapping[str, str] | None = None,
                      connections: int = 64) -> UpstreamClient:
        return cls(upstream.base_url, api=APIS[upstream.api], api_key=api_key_of(upstream, environ),
                   params=upstream.params, connect_timeout=settings.upstream_connect_timeout,
                   read_timeout=settings.upstream_read_timeout, connections=connections)

    async def stream(self, params: Mapping[str, Any]) -> AsyncIterator[CapturedItem]:
        """Yield each SSE event of one streamed call with ``params`` (over the upstream's defaults): ``chunk``
        items with the data byte for byte, or one ``error`` item for an error event. Stops at the stream's end.

        Raises UpstreamError for an error status, a network failure or timeout (before or during the stream),
        or an answer that is not an event stream. Closing the iterator closes the connection.
        """
        request = self.api.request(params, self._defaults, self._api_key)
        try:
            async with self._open().post(self._url(request), data=orjson.dumps(request.body),
                                         headers={**JSON, **request.headers}, allow_redirects=False) as response:
                if response.status >= 400:
                    raise self._status_error(response, await response.read())
                kind = response.headers.get("content-type", "")
                if "text/event-stream" not in kind:
                    raise UpstreamError(self.redact(f"upstream did not answer with an event stream: status "
                                                    f"{response.status}, content-type {kind!r}"))
                decoder = SSEDecoder(self.api.item)
                async for piece in response.content.iter_any():
                    for item in decoder.feed(piece):
                        if item.kind == "done":
                            await self._finish(response)
                            return
                        if item.data or item.kind == "error":
                            yield item
                        if item.kind == "error":
                            return
        except aiohttp.ServerTimeoutError as exc:
            raise UpstreamError(self.redact(f"upstream timed out: {described(exc)}"), retryable=True) from exc
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            # Refused, reset, or cut before the body's end (a chunked body without its last chunk).
            raise UpstreamError(self.redact(f"upstream connection failed: {described(exc)}"), retryable=True) from exc
        except aiohttp.ClientError as exc:  # a malformed answer: the upstream's fault, which a retry will not mend
            raise UpstreamError(self.redact(f"upstream call failed: {described(exc)}")) from exc

    def redact(self, text: str) -> str:
        return redact(text, self._secrets)

    @staticmethod
    async def _finish(response: aiohttp.ClientResponse) -> None:
        """After the stream's end marker, wait a moment for the body's own end, which usually follows at once:
        a connection whose body was read to its end goes back to the pool for the next call, where one left
        unread is closed, and a new one costs a connect (and, to a TLS upstream, a handshake)."""
        try:
            async with asyncio.timeout(BODY_END_WAIT_S):
                while await response.content.readany():
                    pass
        except (TimeoutError, aiohttp.ClientError):
            pass  # an upstream slow to end its body, or one that broke it: the connection is closed instead

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            # No cookie jar: calls are independent of each other, and a jar costs every request a look-up.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._connections, limit_per_host=0), timeout=self._timeout,
                cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    def _url(self, request: Request) -> str:
        query = [*self._query, *request.params.items()]
        return f"{self._base}/{request.path}?{urlencode(query)}" if query else f"{self._base}/{request.path}"

    def _status_error(self, response: aiohttp.ClientResponse, body: bytes) -> UpstreamError:
        status = response.status
        message = error_message(body, response.reason or f"HTTP {status}")
        return UpstreamError(self.redact(message), status=status, retryable=retryable_status(status),
                             retry_after=parse_retry_after(response.headers))

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> UpstreamClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
