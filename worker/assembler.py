"""The Assembler: fold a stream of chunks or events into the completion it stands for.

Pure: no I/O, no clock, no logging. Feed it chunks in order, ask it for the result record at any time.
The stream's dialect - OpenAI-compatible chat chunks, Anthropic Messages events, OpenAI Responses events or
Gemini chunks - is given (``format=``) or recognised from the first chunk; each dialect is a module of
``worker/dialects`` that folds its events into one shared state (``worker/choice.py``), from which the
chat.completion is built the same way for all. The rules, dialect by dialect, are in docs/assembly.md.

Each chunk is checked whole before any of it is applied, so a rejected chunk (``ChunkError``) leaves the
assembler exactly as it was, and a caller can dead-letter that chunk and carry on or stop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import orjson

from streamfold.contract import FORMATS, MODES, Format, Mode, ResultRecord, Status
from streamfold.errors import ChunkError
from worker.choice import CompletionState, normalize_error
from worker.dialects import Dialect, dialect_named, recognize

_OPEN_BRACE = (b"{", "{")  # bytes first: what a worker reads from Redis


class Assembler:
    """Assembles one request's stream.

    ``mode``: ``auto`` (default), ``incremental`` or ``cumulative``, for chat chunks' text. ``format``:
    ``chat``, ``anthropic``, ``responses`` or ``gemini``; None (default) recognises it from the first chunk.
    ``state`` is the shared assembly state, which a follower may read after each chunk (see
    ``worker/choice.py`` for what it may rely on).
    """

    def __init__(self, mode: Mode = "auto", format: Format | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        if format is not None and format not in FORMATS:
            raise ValueError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
        self.mode: Mode = mode
        self.state = CompletionState()
        self._dialect: Dialect | None = None
        self._fed = 0
        self._applied = 0
        self._next_is_error = False
        self._apply: Callable[[dict[str, Any], int], None] = self._recognize
        if format is not None:
            self._use(dialect_named(format)(self.state))

    # --- input -----------------------------------------------------------------------------------------

    def feed(self, chunk: Any) -> None:
        """Apply one chunk: bytes/str JSON, an SSE line, a dict, or an object with ``model_dump()``."""
        position = self._fed
        self._fed = position + 1
        is_error = self._next_is_error
        if is_error:
            self._next_is_error = False  # only the very next data line
        kind = type(chunk)
        if kind is bytes or kind is str:
            try:  # a chunk is almost always a bare JSON object: parsed first, SSE lines are the exception
                obj = orjson.loads(chunk)
            except orjson.JSONDecodeError as exc:
                text = chunk.strip()
                if text[:1] in _OPEN_BRACE:
                    raise ChunkError(f"not JSON ({exc}): {_preview(text)}", position) from None
                text = self._sse_line(text, position, is_error)
                if text is None:
                    return
                try:
                    obj = orjson.loads(text)
                except orjson.JSONDecodeError as inner:
                    raise ChunkError(f"not JSON ({inner}): {_preview(text)}", position) from None
        elif kind is dict:
            obj = chunk
        elif callable(getattr(chunk, "model_dump", None)):
            obj = _dump_model(chunk)
        else:
            raise ChunkError(f"expected bytes, str, dict or a model with model_dump(), got {kind.__name__}",
                             position)
        if type(obj) is not dict:
            raise ChunkError(f"expected a JSON object, got {type(obj).__name__}: {_preview(chunk)}", position)
        if is_error:
            self.fail(obj)
            return
        self._apply(obj, position)
        self._applied += 1

    def fail(self, error: dict[str, Any] | str) -> None:
        """Record an upstream error: the result becomes ``failed``, partial output kept."""
        self.state.fail(error)

    def _recognize(self, event: dict[str, Any], position: int) -> None:
        """Apply the first event with the dialect it is in; only once it was accepted is that the stream's."""
        dialect = recognize(event)(self.state)
        dialect.apply(event, position)
        self._use(dialect)

    def _use(self, dialect: Dialect) -> None:
        self._dialect = dialect
        self._apply = dialect.apply

    @property
    def format(self) -> Format:
        """The stream's dialect: given, recognised from the first chunk, or ``chat`` until one arrived."""
        return "chat" if self._dialect is None else self._dialect.name

    def _sse_line(self, line: str | bytes, position: int, is_error: bool) -> str | bytes | None:
        """The JSON of a ``data:`` line, or None for lines that carry no chunk.

        ``is_error``: an ``event: error`` line came before this one in the same event. A blank line ends
        the event; comments, ``id:`` and ``retry:`` lines keep it going.
        """
        text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
        if not text:
            return None
        if text.startswith(":"):
            self._next_is_error = is_error
            return None
        field, _, value = text.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            if value.strip() == "[DONE]":
                return None
            return value
        if field == "event":
            self._next_is_error = value.strip() == "error"
            return None
        if field in ("id", "retry"):
            self._next_is_error = is_error
            return None
        raise ChunkError(f"not JSON and not an SSE line: {_preview(line)}", position)

    # --- output ----------------------------------------------------------------------------------------

    @property
    def chunks(self) -> int:
        """Chunks applied so far."""
        return self._applied

    @property
    def text_mode(self) -> Mode:
        """How the text fields read: the output mode for chat chunks; native dialects stream increments."""
        dialect = self._dialect
        return self.mode if dialect is None or dialect.follows_mode else "incremental"

    def completion(self, warnings: list[str] | None = None) -> dict[str, Any]:
        """The chat.completion so far, shaped as the non-streaming call would have returned it."""
        return self.state.to_completion(self.text_mode, [] if warnings is None else warnings)

    def native(self, warnings: list[str] | None = None) -> dict[str, Any] | None:
        """The dialect's own final object so far (Anthropic Message, Responses Response, Gemini response)."""
        return None if self._dialect is None else self._dialect.native([] if warnings is None else warnings)

    def status(self) -> Status:
        """``completed``, ``incomplete`` or ``failed``, by the rules of ``CompletionState.status``."""
        return self.state.status()

    def result(self, request_id: str = "", meta: dict[str, Any] | None = None) -> ResultRecord:
        """The result record of the stream so far; call it at the end, or mid-stream for a snapshot."""
        state = self.state
        warnings = list(state.warnings)
        completion = self.completion(warnings)
        native = self.native(warnings)
        return ResultRecord(request_id=request_id, status=state.status(), format=self.format,
                            completion=completion, native=native, error=state.error, warnings=warnings,
                            metrics={"chunks": self._applied}, meta=dict(meta or {}))


def assemble(chunks: Iterable[Any], *, mode: Mode = "auto", format: Format | None = None, request_id: str = "",
             meta: dict[str, Any] | None = None) -> ResultRecord:
    """Assemble a whole stream at once; raises ChunkError on the first chunk that cannot be read."""
    assembler = Assembler(mode, format)
    for chunk in chunks:
        assembler.feed(chunk)
    return assembler.result(request_id, meta)


def _dump_model(chunk: Any) -> Any:
    """A pydantic model (an SDK chunk) as the dict it was built from.

    Only the fields the provider sent (``exclude_unset``): the SDK would otherwise add every field it knows
    as null, e.g. inside ``usage``, which must stay verbatim. Providers' extra fields do not fit the SDK's
    types and pydantic warns about each while serialising; the values themselves come out unchanged.
    """
    try:
        return chunk.model_dump(exclude_unset=True, warnings=False)
    except TypeError:  # a model_dump() that is not pydantic's
        return chunk.model_dump()


def _preview(value: Any, limit: int = 120) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return text if len(text) <= limit else text[:limit] + "..."


__all__ = ["Assembler", "assemble", "normalize_error"]
