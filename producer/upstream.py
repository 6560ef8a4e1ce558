"""The HTTP side of a producer job: one streamed chat completion from an OpenAI-compatible upstream.

``UpstreamClient.stream_chat`` POSTs to ``<base_url>/chat/completions`` and yields each SSE event's data as
received - a chunk, or an ``event: error`` body - until ``[DONE]``. Everything that goes wrong on the way
is translated here, once, into ``UpstreamError`` with the upstream's status and message and whether a retry
can help; ``RetryPolicy`` then decides how long to wait before the next try, or that there is none.

API keys: the client holds its key only in memory, and every message it produces (error texts that end up
in results, log lines) passes through ``redact`` first, in case an upstream echoes the key back.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any

import httpx
import orjson
from httpx_sse import EventSource, SSEError

from streamfold.capture import CapturedItem, sse_item
from streamfold.contract import ErrorInfo
from streamfold.errors import ConfigError, UpstreamError
from streamfold.settings import Settings, Upstream

REDACTED = "[redacted]"
MAX_MESSAGE_LENGTH = 500
# 408 and 409 are what OpenAI's own SDK retries besides 429 and 5xx: timeouts and lock conflicts that pass.
RETRY_STATUSES = frozenset({408, 409, 429})


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


def error_message(body: bytes, fallback: str) -> str:
    """The message of an upstream error body: OpenAI's ``{"error": {"message"}}`` and its common variants."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace").strip()
        return text[:MAX_MESSAGE_LENGTH] or fallback
    inner = parsed.get("error", parsed) if isinstance(parsed, dict) else parsed
    if isinstance(inner, dict):
        inner = inner.get("message") or inner.get("detail") or inner.get("msg")
    return str(inner)[:MAX_MESSAGE_LENGTH] if inner else fallback


def failure(error: UpstreamError) -> ErrorInfo:
    """The error a request fails with after ``error``: the upstream's own message and status, and a type that
    reads the same whichever provider it came from."""
    status = error.status
    if status == 429:
        kind = "rate_limited"
    elif status is not None and status >= 500:
        kind = "server_error"
    elif status is None and error.retryable:
        kind = "connection_error"
    else:
        kind = "upstream_error"
    return ErrorInfo(message=str(error), type=kind, status=status, code=None)


class UpstreamClient:
    """Streams chat completions from one upstream over a pooled httpx client; close it when done.

    ``transport`` replaces the network (tests pass an ``httpx.MockTransport``).
    """

    def __init__(self, base_url: str, *, api_key: str | None = None, connect_timeout: float = 10.0,
                 read_timeout: float = 60.0, transport: httpx.BaseTransport | None = None) -> None:
        url = httpx.URL(base_url)
        self._secrets = (api_key,) if api_key else ()
        # httpx drops a base URL's query when it joins a path onto it; send it as client-wide params instead.
        self._client = httpx.Client(
            base_url=url.copy_with(query=None), params=url.params,
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout), transport=transport)

    @classmethod
    def from_settings(cls, settings: Settings, upstream: Upstream, *, environ: Mapping[str, str] | None = None,
                      transport: httpx.BaseTransport | None = None) -> UpstreamClient:
        return cls(upstream.base_url, api_key=api_key_of(upstream, environ),
                   connect_timeout=settings.upstream_connect_timeout, read_timeout=settings.upstream_read_timeout,
                   transport=transport)

    def stream_chat(self, body: Mapping[str, Any]) -> Generator[CapturedItem, None, None]:
        """Yield each SSE event of one streamed chat completion: ``chunk`` items with the data byte for byte,
        or one ``error`` item for an ``event: error``. Stops at ``[DONE]`` or when the stream ends.

        Raises UpstreamError for an error status, a network failure or timeout (before or during the stream),
        or an answer that is not an event stream. Closing the iterator closes the connection.
        """
        try:
            with self._client.stream("POST", "chat/completions", json=dict(body)) as response:
                if response.status_code >= 400:
                    response.read()
                    raise self._status_error(response)
                for event in EventSource(response).iter_sse():
                    item = sse_item(event.event.encode(), event.data.encode())
                    if item.kind == "done":
                        return
                    if item.kind == "error":
                        yield item
                        return
                    if item.data:
                        yield item
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
        return UpstreamError(self.redact(message), status=status,
                             retryable=status in RETRY_STATUSES or status >= 500,
                             retry_after=parse_retry_after(response.headers))

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> UpstreamClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
