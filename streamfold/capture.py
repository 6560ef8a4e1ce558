"""Read a captured stream: JSON Lines (one chunk per line) or SSE text such as ``curl -N`` prints; and decode
a live SSE body as it arrives.

``SSEDecoder`` is the one definition of how Server-Sent Events are read, for captures (the worker's
``assemble`` command, the producer's ``replay``) and for upstream answers (producer/upstream.py) alike; and
``sse_item`` of what an event means: each ``data:`` payload is one chunk, byte for byte; ``data: [DONE]``
ends the stream; ``event: error`` marks its data as an upstream error. As the SSE spec says: lines end with
CR, LF or CRLF; an event's data may span several ``data:`` lines (joined with newlines) and is dispatched at
the blank line after it; comments, ``id:`` and ``retry:`` are skipped. A capture also passes any other line
on as a chunk, so that garbage is rejected where chunks are read.

A capture may also be what an SDK printed (``print(chunk)``): each printed object, on one line or several,
is parsed - never evaluated - by ``streamfold/sdk_repr.py`` and passed on as the JSON chunk it stands for.
Every item of a capture carries the line it starts on, so that errors can name it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Literal

import orjson

from streamfold.errors import ChunkError
from streamfold.sdk_repr import PrintedLines, looks_printed, parse_printed

Item = Literal["chunk", "error", "done"]
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class CapturedItem:
    kind: Item
    data: bytes = b""
    line: int = field(default=0, compare=False)  # where a capture's item starts, from 1; 0 when not known

    def error_body(self) -> dict[str, Any] | str:
        """An error item's data: its JSON error body when it has one, its text otherwise."""
        try:
            body = orjson.loads(self.data)
        except orjson.JSONDecodeError:
            return self.data.decode("utf-8", "replace")
        return body if isinstance(body, dict) else self.data.decode("utf-8", "replace")


def sse_item(event: bytes, data: bytes) -> CapturedItem:
    """What one SSE event means: an ``event: error``, the ``[DONE]`` marker, or a chunk."""
    if event == b"error":
        return CapturedItem("error", data)
    if data.strip() == b"[DONE]":
        return CapturedItem("done")
    return CapturedItem("chunk", data)


class SSEDecoder:
    """An incremental SSE decoder: ``feed`` it a body's bytes in pieces of any size, as they arrive; it returns
    the events each piece completed, as ``meaning(event name, data)`` says they read.

    A pure object, like the Assembler: no I/O, so the network reader and the capture reader share it.
    ``other_lines`` passes a line that is no SSE field on as a chunk (a capture's garbage, for the reader to
    reject where it is); the spec, and so an upstream's body, ignores it. ``flush`` ends the body: it
    dispatches an event left without its blank line, which a capture may lack; the spec drops it.
    """

    __slots__ = ("_meaning", "_other", "_line", "_event", "_data", "_after_cr", "_fed")

    def __init__(self, meaning: Callable[[bytes, bytes], CapturedItem] = sse_item, *,
                 other_lines: bool = False) -> None:
        self._meaning, self._other = meaning, other_lines
        self._line = b""            # the start of a line whose end has not arrived
        self._event = b""
        self._data: bytes | None = None
        self._after_cr = False      # the last piece ended with CR, so an LF starting the next ends no line
        self._fed = False

    def feed(self, piece: bytes) -> list[CapturedItem]:
        if not self._fed and piece:
            self._fed = True
            piece = piece.removeprefix(BOM)
        if self._after_cr:
            self._after_cr = False
            piece = piece.removeprefix(b"\n")
        if b"\r" in piece:
            self._after_cr = piece.endswith(b"\r")
            piece = piece.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if self._line:
            piece = self._line + piece
        *lines, self._line = piece.split(b"\n")
        items: list[CapturedItem] = []
        for line in lines:
            self._read(line, items)
        return items

    def flush(self) -> list[CapturedItem]:
        """The end of the body: the last line and the last event, as if a blank line followed them."""
        items: list[CapturedItem] = []
        if self._line:
            self._read(self._line, items)
            self._line = b""
        self._read(b"", items)
        return items

    def _read(self, line: bytes, items: list[CapturedItem]) -> None:
        if not line:
            if self._data is not None:
                items.append(self._meaning(self._event, self._data))
            self._event, self._data = b"", None
            return
        if line[0] == 0x3A:  # ":" starts a comment
            return
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data = value if self._data is None else self._data + b"\n" + value
        elif name == b"event":
            self._event = value
        elif self._other and name not in (b"id", b"retry"):
            items.append(CapturedItem("chunk", line))


def read_capture(lines: Iterable[bytes]) -> Iterator[CapturedItem]:
    """Yield the items of a capture, each with the line it starts on. The format - JSON Lines, printed SDK
    objects or SSE - is told by its first non-blank line. A printed object that cannot be read is a
    ChunkError naming its line."""
    numbered = enumerate(lines, 1)
    for number, first in numbered:
        if first.strip():
            break
    else:
        return
    if first.lstrip().startswith((b"{", b"[")):
        yield CapturedItem("chunk", first.strip(), number)
        yield from (CapturedItem("chunk", line.strip(), number) for number, line in numbered if line.strip())
        return
    reader = _read_printed if looks_printed(first) else _read_sse
    yield from reader(chain([(number, first)], numbered))


def _read_sse(numbered: Iterable[tuple[int, bytes]]) -> Iterator[CapturedItem]:
    decoder = SSEDecoder(other_lines=True)
    start = number = 0  # start: the first data line of the event being read
    for number, line in numbered:
        if not start and line.startswith(b"data"):
            start = number
        items = decoder.feed(line)
        if items:
            yield from (CapturedItem(item.kind, item.data, start or number) for item in items)
            start = 0
    yield from (CapturedItem(item.kind, item.data, start or number) for item in decoder.flush())


def _read_printed(numbered: Iterable[tuple[int, bytes]]) -> Iterator[CapturedItem]:
    gathered = PrintedLines()
    start = 0  # the first line of the object being read
    for number, line in numbered:
        if not gathered.open:
            start = number
        try:
            text = gathered.feed(line.decode("utf-8", "replace"))
            if text is not None:
                yield CapturedItem("chunk", _json(parse_printed(text)), start)
        except ChunkError as exc:
            raise ChunkError(f"line {start}: {exc}") from None
    if gathered.open:
        raise ChunkError(f"line {start}: a printed chunk starts here and never ends")


def _json(fields: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(fields)
    except orjson.JSONEncodeError as exc:
        raise ChunkError(f"a printed chunk that cannot be written as JSON: {exc}") from None
