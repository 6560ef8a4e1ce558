"""What the mock upstream sends, and which faults it was asked for: no server here, only bytes.

Each wire API frames a recorded stream its own way: chat completions as ``data: <chunk>`` events closed by
``data: [DONE]``; Anthropic Messages and OpenAI Responses as ``event: <type>`` + ``data: <event>``, the name
being the event's own ``type``; Gemini's ``alt=sse`` as bare ``data:`` lines. Error bodies and error events
take each API's shape too, so a client of any of them reads the mock's failures as it reads the real ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

FAULT_HELP = """\
fault injection (request header X-Mock-<Name>, or query parameter mock_<name>; the query wins):
  X-Mock-Latency-Ms        mock_latency_ms        sleep this many ms before each event
  X-Mock-Disconnect-After  mock_disconnect_after  send N chunks, then drop the connection (no [DONE])
  X-Mock-Malformed-After   mock_malformed_after   after N chunks send one `data: {not json` event, go on
  X-Mock-Error-After       mock_error_after       after N chunks send the API's error event, end
  X-Mock-Status            mock_status            answer with this status (429, 500, 529, ...) and an error body
  X-Mock-Retry-After       mock_retry_after       with a status: send Retry-After: <seconds>
  X-Mock-Fail-Times        mock_fail_times        apply the failure faults only to the first K requests
  X-Mock-Key               mock_key               that carry this key (a counter per key; default "")

example:
  curl -N http://127.0.0.1:8400/v1/chat/completions -H 'X-Mock-Latency-Ms: 50' \\
    -d '{"model": "openai_refusal", "messages": [], "stream": true}'
"""

_MALFORMED = b"data: {not json\n\n"


class FaultError(ValueError):
    """A fault header or query parameter that cannot be read; answered with 400."""


@dataclass(frozen=True, slots=True)
class Faults:
    """The faults one request asked for; the defaults describe a healthy upstream."""

    latency_ms: int = 0
    disconnect_after: int | None = None
    malformed_after: int | None = None
    error_after: int | None = None
    status: int | None = None
    retry_after: int | None = None
    fail_times: int | None = None
    key: str = ""

    def without_failures(self) -> Faults:
        """Only the latency: what a request past its ``fail_times`` gets."""
        return Faults(latency_ms=self.latency_ms)

    def describe(self) -> str:
        """The faults that differ from a healthy upstream, as ``name=value`` words, for the request log."""
        healthy = Faults()
        active = [f"{f.name}={getattr(self, f.name)}" for f in fields(self)
                  if getattr(self, f.name) != getattr(healthy, f.name)]
        return " ".join(active) or "-"


def header_name(fault: str) -> str:
    """``disconnect_after`` -> ``X-Mock-Disconnect-After``."""
    return "X-Mock-" + "-".join(part.capitalize() for part in fault.split("_"))


def read_faults(query: Mapping[str, str], headers: Mapping[str, str]) -> Faults:
    """The faults asked for by query parameters ``mock_<name>`` or headers ``X-Mock-<Name>``."""

    def raw(name: str) -> str | None:
        value = query.get(f"mock_{name}")
        return value if value is not None else headers.get(header_name(name))

    def number(name: str) -> int | None:
        text = raw(name)
        if text is None:
            return None
        try:
            value = int(text)
        except ValueError:
            value = -1
        if value < 0:
            raise FaultError(f"{header_name(name)} / mock_{name} must be a non-negative integer, got {text!r}")
        return value

    status = number("status")
    if status is not None and not 400 <= status <= 599:
        raise FaultError(f"{header_name('status')} / mock_status must be an error status (400-599), got {status}")
    return Faults(latency_ms=number("latency_ms") or 0, disconnect_after=number("disconnect_after"),
                  malformed_after=number("malformed_after"), error_after=number("error_after"), status=status,
                  retry_after=number("retry_after"), fail_times=number("fail_times"), key=raw("key") or "")


def event(api: str, chunk: bytes) -> bytes:
    """One recorded chunk as ``api`` frames it on the wire."""
    if api in ("anthropic", "responses"):
        name = str(json.loads(chunk)["type"])
        return b"event: " + name.encode() + b"\ndata: " + chunk + b"\n\n"
    return b"data: " + chunk + (b"\r\n\r\n" if api == "gemini" else b"\n\n")


def sse_frames(chunks: Sequence[bytes], faults: Faults, api: str = "chat") -> Iterator[bytes | None]:
    """The SSE events to send, in order; ``None`` means: drop the connection here.

    A fault placed after more chunks than the stream has strikes after the last one, before the end.
    """
    last = len(chunks)
    disconnect_at, malformed_at, error_at = (
        None if n is None else min(n, last)
        for n in (faults.disconnect_after, faults.malformed_after, faults.error_after)
    )
    for sent in range(last + 1):
        if sent == disconnect_at:
            yield None
            return
        if sent == malformed_at:
            yield _MALFORMED
        if sent == error_at:
            yield stream_error(api, f"Injected stream error (error_after={sent}).")
            return
        if sent < last:
            yield event(api, chunks[sent])
    if api == "chat":
        yield b"data: [DONE]\n\n"


def stream_error(api: str, message: str) -> bytes:
    """The error event an API sends when a stream fails after it began."""
    if api == "gemini":
        return b"data: " + json.dumps(error_body(api, 500, message)).encode() + b"\r\n\r\n"
    if api == "responses":
        body: object = {"type": "error", "code": "server_error", "message": message, "param": None}
    elif api == "anthropic":
        body = {"type": "error", "error": {"type": "overloaded_error", "message": message}}
    else:
        body = openai_error(message, "server_error")
    return b"event: error\ndata: " + json.dumps(body).encode() + b"\n\n"


def openai_error(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, object]:
    """An error body shaped as OpenAI's: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                    429: "rate_limit_error", 529: "overloaded_error"}
_GEMINI_STATUSES = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}


def error_body(api: str, status: int, message: str) -> dict[str, object]:
    """An error answer's body in ``api``'s own shape."""
    if api == "anthropic":
        kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": message}}
    if api == "gemini":
        return {"error": {"code": status, "message": message,
                          "status": _GEMINI_STATUSES.get(status, "INTERNAL" if status >= 500 else "FAILED_PRECONDITION")}}
    if status == 429:
        return openai_error(message, "requests", "rate_limit_exceeded")
    return openai_error(message, "server_error" if status >= 500 else "invalid_request_error")


def status_message(status: int) -> str:
    """The message of an injected status."""
    if status == 429:
        return "Rate limit reached (injected by the mock upstream)."
    if status == 529:
        return "Overloaded (injected by the mock upstream)."
    if status >= 500:
        return "The server had an error processing your request (injected by the mock upstream)."
    return f"Injected error status {status}."


class FixtureCatalogue:
    """Captured streams by name: the stem of each ``*.jsonl`` file; the first directory listing a stem wins.

    The directories are read on each call, so fixtures added while the server runs are served at once.
    """

    def __init__(self, dirs: Sequence[Path]) -> None:
        self.dirs = tuple(dirs)

    def _paths(self) -> dict[str, Path]:
        paths: dict[str, Path] = {}
        for directory in self.dirs:
            for path in sorted(directory.glob("*.jsonl")):
                paths.setdefault(path.stem, path)
        return paths

    def names(self) -> list[str]:
        return sorted(self._paths())

    def chunks(self, name: str) -> list[bytes] | None:
        """The raw chunk lines of fixture ``name``, or None when there is no such fixture."""
        path = self._paths().get(name)
        if path is None:
            return None
        return [line for line in path.read_bytes().splitlines() if line.strip()]
