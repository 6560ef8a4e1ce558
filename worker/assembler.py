"""The Assembler: fold a stream of chat.completion.chunk objects into the completion it stands for.

Pure: no I/O, no clock, no logging. Feed it chunks in order, ask it for the result record at any time.
The rules it follows, quirk by quirk, are in docs/assembly.md.

Each chunk is checked whole before any of it is applied, so a rejected chunk (``ChunkError``) leaves the
assembler exactly as it was, and a caller can dead-letter that chunk and carry on or stop.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from streamfold.contract import MODES, ErrorInfo, Mode, ResultRecord
from streamfold.errors import ChunkError
from worker.choice import ChoiceState, merge_field
from worker.chunk_checks import META_TYPES, check_choices, check_tool_calls, check_top_level, meta_types_ok

_OPEN_BRACE = (b"{", "{")  # bytes first: what a worker reads from Redis
_TOP_LEVEL = frozenset({"choices", "usage", "error", "service_tier", "object", *META_TYPES})


class Assembler:
    """Assembles one request's stream. ``mode``: ``auto`` (default), ``incremental`` or ``cumulative``."""

    def __init__(self, mode: Mode = "auto") -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        self.mode: Mode = mode
        self._fed = 0
        self._applied = 0
        self._id: str | None = None
        self._model: str | None = None
        self._created: int | None = None
        self._fingerprint: str | None = None
        self._service_tier: str | None = None
        self._usage: dict[str, Any] | None = None
        self._error: ErrorInfo | None = None
        self._extra: dict[str, Any] = {}
        self._choices: dict[int, ChoiceState] = {}
        self._meta_missing = True
        self._next_is_error = False

    # --- input -----------------------------------------------------------------------------------------

    def feed(self, chunk: Any) -> None:
        """Apply one chunk: bytes/str JSON, an SSE line, a dict, or an object with ``model_dump()``."""
        position = self._fed
        self._fed += 1
        kind = type(chunk)
        is_error, self._next_is_error = self._next_is_error, False  # only the very next data line
        if kind is bytes or kind is str:
            text = chunk
            if text[:1] not in _OPEN_BRACE:
                text = self._sse_line(text.strip(), position, is_error)
                if text is None:
                    return
            try:
                obj = orjson.loads(text)
            except orjson.JSONDecodeError as exc:
                raise ChunkError(f"not JSON ({exc}): {_preview(text)}", position) from None
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

    def fail(self, error: dict[str, Any] | str) -> None:
        """Record an upstream error: the result becomes ``failed``, partial output kept."""
        self._error = normalize_error(error)

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

    def _apply(self, chunk: dict[str, Any], position: int) -> None:
        # Read and check everything first, mutate after: a rejected chunk must change nothing.
        get = chunk.get
        choices, usage, error = get("choices"), get("usage"), get("error")
        fingerprint = get("system_fingerprint") if self._fingerprint is None else None
        if ((choices is not None and type(choices) is not list) or (usage is not None and type(usage) is not dict)
                or error is not None or (fingerprint is not None and type(fingerprint) is not str)
                or (self._meta_missing and not meta_types_ok(chunk))):
            check_top_level(chunk, position)  # names what is wrong; an error that is fine is applied below
        tier = get("service_tier")
        extra = None
        if not chunk.keys() <= _TOP_LEVEL:  # a provider's own fields: rare, so found by one set test
            extra = [(key, value) for key, value in chunk.items() if key not in _TOP_LEVEL and value is not None]
        simple = _read_plain_choice(choices[0]) if choices and len(choices) == 1 else None
        if simple is None:
            if choices:
                check_choices(choices, position)
            elif "choices" not in chunk and usage is None and error is None:
                check_top_level(chunk, position)
        elif simple[7] is not None:
            check_tool_calls(simple[7], position)

        self._applied += 1
        if self._meta_missing:
            self._take_meta(chunk)
        if fingerprint:
            self._fingerprint = fingerprint
        if simple is not None:
            index, finish, content, role, reasoning_content, reasoning, refusal, tool_calls = simple
            self._apply_plain_choice(index, finish, content, role, reasoning_content, reasoning, refusal, tool_calls)
        elif choices:
            for choice in choices:
                _apply_choice(self._choice(choice.get("index") or 0), choice)
        if usage is not None:
            self._usage = usage
        if tier is not None:
            self._service_tier = tier
        if error is not None:
            self.fail(error)
        if extra is not None:
            for key, value in extra:
                merge_field(self._extra, key, value)

    def _apply_plain_choice(self, index: int, finish: str | None, content: str | None, role: str | None,
                            reasoning_content: str | None, reasoning: str | None, refusal: str | None,
                            tool_calls: list[Any] | None) -> None:
        state = self._choice(index)
        if content is not None:
            state.content.add(content)
        if role and state.role is None:
            state.role = role
        if reasoning_content is not None:
            state.reasoning_content.add(reasoning_content)
        if reasoning is not None:
            state.reasoning.add(reasoning)
        if refusal is not None:
            state.refusal.add(refusal)
        if tool_calls is not None:
            for fragment in tool_calls:
                state.add_tool_call(fragment)
        if finish is not None:
            state.finish_reason = finish

    def _choice(self, index: int) -> ChoiceState:
        state = self._choices.get(index)
        if state is None:
            state = self._choices[index] = ChoiceState(index)
        return state

    def _take_meta(self, chunk: dict[str, Any]) -> None:
        """id, model, created: the first non-empty value of each."""
        if self._id is None:
            self._id = chunk.get("id") or None
        if self._model is None:
            self._model = chunk.get("model") or None
        if self._created is None:
            self._created = chunk.get("created") or None
        # The fingerprint is looked for apart: many providers never send one.
        self._meta_missing = None in (self._id, self._model, self._created)

    # --- output ----------------------------------------------------------------------------------------

    @property
    def chunks(self) -> int:
        """Chunks applied so far."""
        return self._applied

    def completion(self, warnings: list[str] | None = None) -> dict[str, Any]:
        """The chat.completion so far, shaped as the non-streaming call would have returned it."""
        warnings = [] if warnings is None else warnings
        completion: dict[str, Any] = {"id": self._id or "", "object": "chat.completion",
                                      "created": self._created or 0, "model": self._model or ""}
        if self._fingerprint is not None:
            completion["system_fingerprint"] = self._fingerprint
        if self._service_tier is not None:
            completion["service_tier"] = self._service_tier
        completion["choices"] = [self._choices[index].to_dict(self.mode, warnings)
                                 for index in sorted(self._choices)]
        completion["usage"] = self._usage
        completion.update(self._extra)
        return completion

    def status(self) -> str:
        if self._error is not None:
            return "failed"
        choices = self._choices.values()
        if choices and all(choice.finish_reason is not None for choice in choices):
            return "completed"
        return "incomplete"

    def result(self, request_id: str = "", meta: dict[str, Any] | None = None) -> ResultRecord:
        """The result record of the stream so far; call it at the end, or mid-stream for a snapshot."""
        warnings: list[str] = []
        completion = self.completion(warnings)
        return ResultRecord(request_id=request_id, status=self.status(),  # type: ignore[typeddict-item]
                            completion=completion, error=self._error, warnings=warnings,
                            metrics={"chunks": self._applied}, meta=dict(meta or {}))


def assemble(chunks: Iterable[Any], *, mode: Mode = "auto", request_id: str = "",
             meta: dict[str, Any] | None = None) -> ResultRecord:
    """Assemble a whole stream at once; raises ChunkError on the first chunk that cannot be read."""
    assembler = Assembler(mode)
    for chunk in chunks:
        assembler.feed(chunk)
    return assembler.result(request_id, meta)


def normalize_error(error: dict[str, Any] | str) -> ErrorInfo:
    """An upstream error in the record's shape: message, type, code, status."""
    if isinstance(error, str):
        return ErrorInfo(message=error, type="upstream_error", code=None, status=None)
    inner = error.get("error")
    if isinstance(inner, dict):
        error = inner
    message = error.get("message") or error.get("detail") or orjson.dumps(error).decode()
    status = error.get("status")
    code = error.get("code")
    return ErrorInfo(message=str(message), type=str(error.get("type") or "upstream_error"),
                     code=None if code is None else str(code),
                     status=status if isinstance(status, int) else None)


PlainChoice = tuple[int, str | None, str | None, str | None, str | None, str | None, str | None, list[Any] | None]


def _read_plain_choice(choice: Any) -> PlainChoice | None:
    """The common case, read and checked in one pass: a choice whose delta holds only text and tool calls.

    Returns (index, finish_reason, content, role, reasoning_content, reasoning, refusal, tool_calls), or None
    when the choice needs the general path (logprobs, content parts, unknown fields, wrong types). The tool
    calls, when there are any, are still to be checked with ``check_tool_calls``.
    """
    if type(choice) is not dict:
        return None
    index, finish, delta = 0, None, None
    for key, value in choice.items():
        if value is None:
            continue
        if key == "delta":
            if type(value) is not dict:
                return None
            delta = value
        elif key == "index":
            if type(value) is not int:
                return None
            index = value
        elif key == "finish_reason":
            if type(value) is not str:
                return None
            finish = value
        else:
            return None
    content = role = reasoning_content = reasoning = refusal = tool_calls = None
    if delta:
        for key, value in delta.items():
            if value is None:
                continue
            if type(value) is not str:
                if key == "tool_calls" and type(value) is list:
                    tool_calls = value
                    continue
                return None
            if key == "content":
                content = value
            elif key == "role":
                role = value
            elif key == "reasoning_content":
                reasoning_content = value
            elif key == "reasoning":
                reasoning = value
            elif key == "refusal":
                refusal = value
            else:
                return None
    return index, finish, content, role, reasoning_content, reasoning, refusal, tool_calls


def _apply_choice(state: ChoiceState, choice: dict[str, Any]) -> None:
    for key, value in choice.items():
        if value is None:
            continue
        if key == "delta":
            _apply_delta(state, value)
        elif key == "finish_reason":
            state.finish_reason = value
        elif key == "logprobs":
            state.add_logprobs(value)
        elif key != "index":
            merge_field(state.extra, key, value)


def _apply_delta(state: ChoiceState, delta: dict[str, Any]) -> None:
    for key, value in delta.items():
        if value is None:
            continue
        if key == "content":
            if type(value) is str:
                state.content.add(value)
            else:
                state.add_content_parts(value)
        elif key == "reasoning_content":
            state.reasoning_content.add(value)
        elif key == "role":
            if state.role is None and value:
                state.role = value
        elif key == "tool_calls":
            for fragment in value:
                state.add_tool_call(fragment)
        elif key == "refusal":
            state.refusal.add(value)
        elif key == "reasoning":
            state.reasoning.add(value)
        elif key == "function_call":
            state.add_function_call(value)
        elif key != "index":
            merge_field(state.message_extra, key, value)


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
