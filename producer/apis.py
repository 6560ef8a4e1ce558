"""The upstream APIs a call can speak, one table: where to POST, how to authenticate, what to send, how to read.

``chat`` is OpenAI's chat completions, which every OpenAI-compatible provider serves. The native APIs stream
their own events, pushed as received like chat chunks are: ``anthropic`` (Messages, ``POST {base}/messages``),
``responses`` (OpenAI Responses, ``POST {base}/responses``) and ``gemini`` (``POST
{base}/models/{model}:streamGenerateContent?alt=sse``). Everything else about a call - retries, attempts,
cancel, key redaction, the runner's concurrency - is the same for all of them.

Each API says here, once: the request (path, auth headers, body), what one SSE event means (a chunk, an error,
the end), how its error bodies read, and which statuses are worth a retry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from streamfold.capture import CapturedItem, sse_item
from streamfold.settings import API_NAMES, ApiName

ANTHROPIC_VERSION = "2023-06-01"
MAX_MESSAGE_LENGTH = 500
# 408 and 409 are what OpenAI's own SDK retries besides 429 and 5xx: timeouts and lock conflicts that pass.
# Anthropic's 529 (overloaded) is a 5xx and retried with them.
RETRY_STATUSES = frozenset({408, 409, 429})


def retryable_status(status: int) -> bool:
    """Whether an upstream answering ``status`` may answer better on a later try."""
    return status in RETRY_STATUSES or status >= 500


@dataclass(frozen=True, slots=True)
class Request:
    """What to send upstream for one call: a path below the base URL, headers, query and the JSON body."""

    path: str
    headers: dict[str, str]
    params: dict[str, str]
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Api:
    """One upstream API: its request shape and its stream's meaning."""

    name: ApiName

    def request(self, params: Mapping[str, Any], defaults: Mapping[str, Any], api_key: str | None) -> Request:
        """The request for a call with ``params`` over the upstream's default ``params``: streaming always on,
        and for chat, usage asked for, so every call's tokens are counted."""
        body = {**defaults, **params}
        if self.name == "chat":
            options = {**(defaults.get("stream_options") or {}), **(params.get("stream_options") or {})}
            body.update(stream=True, stream_options={**options, "include_usage": True})
            return Request("chat/completions", _bearer(api_key), {}, body)
        if self.name == "anthropic":
            headers = {"anthropic-version": ANTHROPIC_VERSION, **({"x-api-key": api_key} if api_key else {})}
            return Request("messages", headers, {}, {**body, "stream": True})
        if self.name == "responses":
            return Request("responses", _bearer(api_key), {}, {**body, "stream": True})
        model = body.pop("model", None)
        body.pop("stream", None)
        headers = {"x-goog-api-key": api_key} if api_key else {}
        return Request(f"models/{model}:streamGenerateContent", headers, {"alt": "sse"}, body)

    def item(self, event: bytes, data: bytes) -> CapturedItem:
        """What one SSE event of this API means. Every API marks a stream error with ``event: error``; Gemini
        sends its errors as a data object with ``error`` instead. The end is where the stream ends (chat also
        says ``[DONE]``); each event before it is a chunk, pushed byte for byte."""
        if self.name == "gemini" and data.startswith(b'{"error"'):
            return CapturedItem("error", data)
        return sse_item(event, data)


APIS: dict[str, Api] = {name: Api(name) for name in API_NAMES}  # type: ignore[arg-type]


def _bearer(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def error_message(body: bytes, fallback: str) -> str:
    """The message of an upstream error body, whichever API sent it: OpenAI's and Gemini's ``{"error":
    {"message"}}``, Anthropic's ``{"type": "error", "error": {"type", "message"}}`` and common variants."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace").strip()
        return text[:MAX_MESSAGE_LENGTH] or fallback
    inner = parsed.get("error", parsed) if isinstance(parsed, dict) else parsed
    if isinstance(inner, list) and inner and isinstance(inner[0], dict):  # Gemini over REST wraps it in a list
        inner = inner[0].get("error", inner[0])
    if isinstance(inner, dict):
        inner = inner.get("message") or inner.get("detail") or inner.get("msg")
    return str(inner)[:MAX_MESSAGE_LENGTH] if inner else fallback


def error_kind(status: int | None, retryable: bool) -> str:
    """The error type a failed request reports, reading the same whichever API it came from."""
    if status == 429:
        return "rate_limited"
    if status == 529:
        return "overloaded"
    if status is not None and status >= 500:
        return "server_error"
    if status is None and retryable:
        return "connection_error"
    return "upstream_error"
