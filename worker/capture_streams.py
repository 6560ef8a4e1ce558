"""A capture that holds several streams: split it by chunk ``id``, one Assembler per stream.

A log often holds more than one call - two requests printed by the same process, even interleaved. Their
chunks carry different ids, and folding them into one completion mixes both texts without a trace. Here
each chunk goes to the stream of its ``id``, streams in the order their ids were first seen; a chunk without
an id (or with ``""``, as Azure's prompt-filter chunk has) stays with the stream of the chunk before it, and
the first id seen names the chunks read before it. Native dialects' events carry no top-level ``id``, so such
a capture stays one stream. With ``single=True`` the capture must be one stream: a second id is an error
naming its line.

Pure, like the Assembler: fed captured items, asked for records; the caller reads the file.
"""

from __future__ import annotations

from typing import Any

import orjson

from streamfold.capture import CapturedItem
from streamfold.contract import Format, Mode, ResultRecord
from streamfold.errors import ChunkError
from worker.assembler import Assembler


class _Stream:
    __slots__ = ("id", "line", "assembler")

    def __init__(self, id: str | None, line: int, assembler: Assembler) -> None:
        self.id, self.line, self.assembler = id, line, assembler


class CaptureStreams:
    """Assembles every stream of one capture; ``results`` gives one record per stream."""

    def __init__(self, mode: Mode = "auto", format: Format | None = None, *, single: bool = False) -> None:
        self._mode, self._format, self._single = mode, format, single
        self._streams: list[_Stream] = []
        self._by_id: dict[str, _Stream] = {}
        self._current: _Stream | None = None

    def feed(self, item: CapturedItem) -> None:
        """Apply one item of the capture to its stream; raises ChunkError, naming the item's line, if the
        chunk cannot be assembled (or, with ``single``, belongs to a second stream)."""
        if item.kind == "done":
            return
        chunk: Any = item.data
        stream = self._current
        if item.kind == "chunk":
            try:
                chunk = orjson.loads(item.data)
            except orjson.JSONDecodeError:
                chunk = item.data  # an SSE line or garbage: the assembler says what is wrong with it
            chunk_id = chunk.get("id") if type(chunk) is dict else None
            if isinstance(chunk_id, str) and chunk_id:
                stream = self._stream_of(chunk_id, item.line)
        if stream is None:
            stream = self._start(None, item.line)
        self._current = stream
        try:
            if item.kind == "error":
                stream.assembler.fail(item.error_body())
            else:
                stream.assembler.feed(chunk)
        except ChunkError as exc:
            where = f" (stream {stream.id})" if len(self._streams) > 1 else ""
            raise ChunkError(f"line {item.line}: {exc}{where}") from None

    def results(self, source: str) -> list[ResultRecord]:
        """One record per stream, in first-seen order. A capture of one stream (or none) gives one record
        named ``source``, as before streams were split; several are named ``source#1``, ``source#2``, ..."""
        if len(self._streams) <= 1:
            assembler = self._streams[0].assembler if self._streams else Assembler(self._mode, self._format)
            return [assembler.result(request_id=source, meta={"source": source})]
        return [stream.assembler.result(request_id=f"{source}#{number}",
                                        meta={"source": source, "chunk_id": stream.id, "line": stream.line})
                for number, stream in enumerate(self._streams, 1)]

    def _stream_of(self, chunk_id: str, line: int) -> _Stream:
        stream = self._by_id.get(chunk_id)
        if stream is not None:
            return stream
        current = self._current
        if current is not None and current.id is None:  # the chunks before the first id were its stream's
            current.id = chunk_id
            self._by_id[chunk_id] = current
            return current
        if self._single and current is not None:
            raise ChunkError(f"line {line}: the chunk id changes from {current.id!r} to {chunk_id!r}: "
                             "the capture holds more than one stream (without --single each gets a record)")
        return self._start(chunk_id, line)

    def _start(self, chunk_id: str | None, line: int) -> _Stream:
        stream = _Stream(chunk_id, line, Assembler(self._mode, self._format))
        self._streams.append(stream)
        if chunk_id is not None:
            self._by_id[chunk_id] = stream
        return stream
