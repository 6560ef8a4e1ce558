"""The one assembly state every dialect folds into: text fields, tool-call buffers, choices, the completion.

Everything here is plain data with small methods; a dialect checks each event whole before it calls anything
here, so these methods never see malformed input and never raise on it. The chat.completion is built from
this state by one code path (``CompletionState.to_completion``), whichever dialect fed it.

What a follower, feeding events one at a time and diffing this state after each, may rely on (native
dialects; chat chunks keep the same shapes, but their text may be cumulative - see ``TextField`` - and a
call's id and name may come after the call appeared, in a later fragment):

- ``CompletionState.choices`` only gains choices; a choice's ``ChoiceState`` object stays the same one.
- ``TextField.parts`` of ``content``, ``reasoning_content`` and ``refusal`` only grow, by appending; what
  was appended is never changed or removed. The field's text is the parts joined.
- ``ChoiceState.calls`` only grows by appending, in the calls' final order. A call's ``id``, ``type`` and
  ``name`` are set when it is appended; its ``arguments`` parts only grow by appending; ``done`` turns true
  once, when the dialect knows the call is complete, and nothing is appended after that.
- ``ChoiceState.finish_reason`` is the chat finish reason, mapped from the provider's.
- ``CompletionState.usage()`` is the normalized chat usage at any point (None until some count arrived).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from streamfold.contract import ErrorInfo, Mode, Status


class TextField:
    """One streamed text (content, refusal, reasoning) that may be incremental or cumulative.

    It keeps the incremental reading (all parts, joined at the end) and, until the stream disproves it, the
    evidence for a cumulative one (each value starting with the one before), so ``auto`` can decide at the
    end without buffering anything twice.
    """

    __slots__ = ("parts", "last", "seen", "chain", "growth", "repeats")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.last = ""
        self.seen = False  # some chunk carried a string here, even an empty one
        self.chain = True  # every non-empty value so far starts with the one before it
        self.growth = 0  # values strictly longer than the one before
        self.repeats = 0  # times the last value was sent again, right after itself

    def add(self, text: str) -> None:
        self.seen = True
        if not text:
            return
        parts = self.parts
        if self.chain and parts:
            last = self.last
            if text == last:
                self.repeats += 1
            elif text.startswith(last):
                self.growth += 1
                self.repeats = 0
            else:
                self.chain = False
        parts.append(text)
        self.last = text

    def append(self, text: str) -> None:
        """Add a piece of a text that is known to be incremental: native dialects, no cumulative evidence kept."""
        self.seen = True
        if text:
            self.parts.append(text)

    def looks_cumulative(self) -> bool:
        """The ``auto`` rule: unmistakably cumulative, never an ordinary incremental stream."""
        return self.chain and len(self.parts) >= 3 and self.growth >= 2 and self.repeats >= 1

    def value(self, mode: Mode) -> str | None:
        if not self.seen:
            return None
        if mode == "cumulative" or (mode == "auto" and self.looks_cumulative()):
            return self.last
        return "".join(self.parts)


class ToolCallBuffer:
    """One tool call being assembled: id, type and name are set once; arguments are concatenated.

    ``done`` is set by dialects that say explicitly when a call is complete (Anthropic's
    ``content_block_stop``, the Responses ``*.done`` events, Gemini's whole calls); chat chunks never do.
    """

    __slots__ = ("index", "id", "type", "name", "arguments", "extra", "done")

    def __init__(self, index: int) -> None:
        self.index = index
        self.id: str | None = None
        self.type: str | None = None
        self.name: str | None = None
        self.arguments: list[str] = []
        self.extra: dict[str, Any] = {}
        self.done = False

    def apply(self, fragment: dict[str, Any]) -> None:
        for key, value in fragment.items():
            if value is None or key == "index":
                continue
            if key == "id":
                if value and self.id is None:
                    self.id = value
            elif key == "type":
                if value and self.type is None:
                    self.type = value
            elif key == "function":
                name = value.get("name")
                if name and self.name is None:
                    self.name = name
                arguments = value.get("arguments")
                if isinstance(arguments, str):
                    if arguments:
                        self.arguments.append(arguments)
                elif arguments is not None:
                    self.arguments.append(orjson.dumps(arguments).decode())
            else:
                merge_field(self.extra, key, value)

    def to_dict(self) -> dict[str, Any]:
        call: dict[str, Any] = {"id": self.id, "type": self.type or "function",
                                "function": {"name": self.name or "", "arguments": "".join(self.arguments)}}
        call.update(self.extra)
        return call


class ChoiceState:
    """Everything known so far about one choice of the completion."""

    __slots__ = ("index", "role", "content", "refusal", "reasoning_content", "reasoning", "calls", "by_index",
                 "by_id", "last_call", "function_name", "function_arguments", "finish_reason",
                 "logprobs_seen", "logprobs_content", "logprobs_refusal", "extra", "message_extra")

    def __init__(self, index: int) -> None:
        self.index = index
        self.role: str | None = None
        self.content = TextField()
        self.refusal = TextField()
        self.reasoning_content = TextField()
        self.reasoning = TextField()
        self.calls: list[ToolCallBuffer] = []
        self.by_index: dict[int, ToolCallBuffer] = {}
        self.by_id: dict[str, ToolCallBuffer] = {}
        self.last_call: ToolCallBuffer | None = None
        self.function_name: str | None = None
        self.function_arguments: list[str] | None = None
        self.finish_reason: str | None = None
        self.logprobs_seen = False
        self.logprobs_content: list[Any] | None = None
        self.logprobs_refusal: list[Any] | None = None
        self.extra: dict[str, Any] = {}
        self.message_extra: dict[str, Any] = {}

    def add_content_parts(self, parts: list[dict[str, Any]]) -> None:
        for part in parts:
            kind = part.get("type")
            if kind == "text":
                self.content.add(part.get("text") or "")
            elif kind == "thinking":
                thinking = part.get("thinking")
                if isinstance(thinking, str):
                    self.reasoning_content.add(thinking)
                else:
                    for inner in thinking or ():
                        if inner.get("type") == "text":
                            self.reasoning_content.add(inner.get("text") or "")

    def open_call(self, call_id: str, name: str) -> ToolCallBuffer:
        """Append a call a native dialect knows whole from its start: id and name at once."""
        call = ToolCallBuffer(len(self.calls))
        call.id, call.type, call.name = call_id, "function", name
        self.calls.append(call)
        self.last_call = call
        return call

    def add_tool_call(self, fragment: dict[str, Any]) -> None:
        """Route a fragment to its call: by index, by id, or to the last call when it has no index."""
        index = fragment.get("index")
        call_id = fragment.get("id") or None
        call = self.by_id.get(call_id) if call_id is not None else None
        if call is None:
            call = self.last_call if index is None else self.by_index.get(index)
            if call is None or (call_id is not None and call.id is not None and call.id != call_id):
                if index is None:
                    index = max(self.by_index, default=-1) + 1
                call = ToolCallBuffer(index)
                self.calls.append(call)
                self.by_index[index] = call
        call.apply(fragment)
        if call.id is not None:
            self.by_id.setdefault(call.id, call)
        self.last_call = call

    def add_function_call(self, function_call: dict[str, Any]) -> None:
        name = function_call.get("name")
        if name and self.function_name is None:
            self.function_name = name
        if self.function_arguments is None:
            self.function_arguments = []
        arguments = function_call.get("arguments")
        if arguments:
            self.function_arguments.append(arguments)

    def add_logprobs(self, logprobs: dict[str, Any]) -> None:
        self.logprobs_seen = True
        content = logprobs.get("content")
        if content is not None:
            if self.logprobs_content is None:
                self.logprobs_content = []
            self.logprobs_content.extend(content)
        refusal = logprobs.get("refusal")
        if refusal is not None:
            if self.logprobs_refusal is None:
                self.logprobs_refusal = []
            self.logprobs_refusal.extend(refusal)

    def to_dict(self, mode: Mode, warnings: list[str]) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role or "assistant", "content": self.content.value(mode),
                                   "refusal": self.refusal.value(mode)}
        for name in ("reasoning_content", "reasoning"):
            field: TextField = getattr(self, name)
            if field.seen:
                message[name] = field.value(mode)
        for name in ("content", "refusal", "reasoning_content", "reasoning"):
            field = getattr(self, name)
            if mode == "cumulative" and not field.chain:
                warnings.append(f"choice {self.index}: {name} did not always extend the text before it "
                                "(cumulative mode); kept the last value")
        if self.calls:
            message["tool_calls"] = [call.to_dict() for call in self.calls]
            for position, call in enumerate(message["tool_calls"]):
                _check_arguments(self.index, position, call, warnings)
        if self.function_arguments is not None or self.function_name is not None:
            message["function_call"] = {"name": self.function_name or "",
                                        "arguments": "".join(self.function_arguments or ())}
        message.update(self.message_extra)
        logprobs = None
        if self.logprobs_seen:
            logprobs = {"content": self.logprobs_content, "refusal": self.logprobs_refusal}
        choice = {"index": self.index, "message": message, "finish_reason": self.finish_reason,
                  "logprobs": logprobs}
        choice.update(self.extra)
        return choice


class CompletionState:
    """Everything known so far about the completion, whatever dialect fed it; see the module docstring.

    ``raw_usage`` is the usage as the provider sent it (the last one: running totals are taken, never
    summed); ``usage_map`` turns a native dialect's usage into the chat shape (None for chat chunks, whose
    usage is already in it). ``final`` is None for dialects whose end is every choice's finish reason (chat,
    Gemini), False until the final event of the others (Anthropic ``message_stop``, the Responses
    ``response.completed``/``incomplete``/``failed``), True after it.
    """

    __slots__ = ("id", "model", "created", "fingerprint", "service_tier", "raw_usage", "usage_map", "error",
                 "extra", "choices", "warnings", "final")

    def __init__(self) -> None:
        self.id: str | None = None
        self.model: str | None = None
        self.created: int | None = None
        self.fingerprint: str | None = None
        self.service_tier: str | None = None
        self.raw_usage: dict[str, Any] | None = None
        self.usage_map: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None
        self.error: ErrorInfo | None = None
        self.extra: dict[str, Any] = {}
        self.choices: dict[int, ChoiceState] = {}
        self.warnings: list[str] = []  # found while events were applied; the record lists them first
        self.final: bool | None = None

    def choice(self, index: int) -> ChoiceState:
        """The choice's state, opened on first use."""
        state = self.choices.get(index)
        if state is None:
            state = self.choices[index] = ChoiceState(index)
        return state

    def usage(self) -> dict[str, Any] | None:
        """The usage in the chat shape: prompt_tokens, completion_tokens, total_tokens and their details."""
        raw, mapping = self.raw_usage, self.usage_map
        if raw is None or mapping is None:
            return raw
        return mapping(raw)

    def fail(self, error: dict[str, Any] | str) -> None:
        """Record an upstream error: the result becomes ``failed``, partial output kept."""
        self.error = normalize_error(error)

    def status(self) -> Status:
        if self.error is not None:
            return "failed"
        choices = self.choices.values()
        if choices and self.final is not False and all(choice.finish_reason is not None for choice in choices):
            return "completed"
        return "incomplete"

    def to_completion(self, mode: Mode, warnings: list[str]) -> dict[str, Any]:
        """The chat.completion so far, shaped as the non-streaming call would have returned it."""
        completion: dict[str, Any] = {"id": self.id or "", "object": "chat.completion",
                                      "created": self.created or 0, "model": self.model or ""}
        if self.fingerprint is not None:
            completion["system_fingerprint"] = self.fingerprint
        if self.service_tier is not None:
            completion["service_tier"] = self.service_tier
        choices = self.choices
        completion["choices"] = [choices[index].to_dict(mode, warnings) for index in sorted(choices)]
        completion["usage"] = self.usage()
        completion.update(self.extra)
        return completion


def normalize_error(error: dict[str, Any] | str) -> ErrorInfo:
    """An upstream error in the record's shape: message, type, code, status."""
    if isinstance(error, str):
        return ErrorInfo(message=error, type="upstream_error", code=None, status=None)
    inner = error.get("error")
    if isinstance(inner, dict):
        error = inner
    message = error.get("message") or error.get("detail")
    if not message:
        try:
            message = orjson.dumps(error).decode()
        except orjson.JSONEncodeError:  # nested past what orjson writes: the error still has to be recorded
            message = "upstream error"
    status = error.get("status")
    code = error.get("code")
    return ErrorInfo(message=str(message), type=str(error.get("type") or "upstream_error"),
                     code=None if code is None else str(code),
                     status=status if isinstance(status, int) and not isinstance(status, bool) else None)


def merge_field(target: dict[str, Any], key: str, value: Any) -> None:
    """Keep an unknown provider field: objects merge key by key (later wins), anything else is replaced."""
    if value is None:
        return
    old = target.get(key)
    if isinstance(value, dict) and isinstance(old, dict):
        target[key] = {**old, **value}
    else:
        target[key] = value


def _check_arguments(choice: int, position: int, call: dict[str, Any], warnings: list[str]) -> None:
    arguments = call["function"]["arguments"]
    if not arguments:
        return
    try:
        orjson.loads(arguments)
    except orjson.JSONDecodeError as exc:
        warnings.append(f"choice {choice} tool call {position} ({call['function']['name'] or call['id']}): "
                        f"arguments are not valid JSON ({exc})")
