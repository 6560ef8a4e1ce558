"""Read a captured stream: JSON Lines (one chunk per line) or SSE text such as ``curl -N`` prints.

Both the worker's ``assemble`` command and the producer's ``replay`` command read captures through here, so
they agree on what a capture means: each ``data:`` payload is one chunk, byte for byte; ``data: [DONE]``
ends the stream; ``event: error`` marks its data as an upstream error; comments, ``id:`` and ``retry:``
are skipped; any other line is passed on as a chunk, so that garbage is rejected where chunks are read. An SSE event's data may span several ``data:`` lines (joined with newlines, as the SSE spec says).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import orjson

Item = Literal["chunk", "error", "done"]


@dataclass(frozen=True, slots=True)
class CapturedItem:
    kind: Item
    data: bytes = b""

    def error_body(self) -> dict[str, Any] | str:
        """An error item's data: its JSON error body when it has one, its text otherwise."""
        try:
            body = orjson.loads(self.data)
        except orjson.JSONDecodeError:
            return self.data.decode("utf-8", "replace")
        return body if isinstance(body, dict) else self.data.decode("utf-8", "replace")


def read_capture(lines: Iterable[bytes]) -> Iterator[CapturedItem]:
    """Yield the chunks of a capture. The format is told by its first non-blank line."""
    it = iter(lines)
    for first in it:
        if first.strip():
            break
    else:
        return
    if first.lstrip().startswith((b"{", b"[")):
        yield CapturedItem("chunk", first.strip())
        yield from (CapturedItem("chunk", line.strip()) for line in it if line.strip())
    else:
        yield from _read_sse(_chain(first, it))


def _chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


def _read_sse(lines: Iterable[bytes]) -> Iterator[CapturedItem]:
    event = b""
    data: list[bytes] = []
    for raw in lines:
        line = raw.rstrip(b"\r\n")
        if not line:
            if data:
                yield sse_item(event, b"\n".join(data))
            event, data = b"", []
            continue
        if line.startswith(b":"):
            continue
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"event":
            event = value
        elif name not in (b"id", b"retry"):
            # Not SSE at all: hand it on as a chunk so the reader rejects it with its position.
            yield CapturedItem("chunk", line)
    if data:
        yield sse_item(event, b"\n".join(data))


def sse_item(event: bytes, data: bytes) -> CapturedItem:
    """What one SSE event means: an ``event: error``, the ``[DONE]`` marker, or a chunk."""
    if event == b"error":
        return CapturedItem("error", data)
    if data.strip() == b"[DONE]":
        return CapturedItem("done")
    return CapturedItem("chunk", data)
