"""Anthropic Messages streams: ``message_start`` ... ``message_stop``, folded into the shared state.

``message_start`` carries the Message with empty content and the usage so far; each content block then
streams as ``content_block_start``, ``content_block_delta``s and ``content_block_stop`` under its ``index``;
``message_delta`` brings the stop reason and usage again, as running totals (taken, never summed: its
``output_tokens`` is the final count, and ``input_tokens`` may differ from the start's); ``message_stop``
ends the stream; ``ping`` carries nothing; ``error`` fails it.

Into the completion: text blocks -> content, joined as they come (citations split one sentence across
blocks); thinking -> reasoning_content; tool_use -> tool_calls, arguments the joined ``input_json_delta``
fragments, or the block's start ``input`` (``{}``) when none came. Server tools (``server_tool_use`` and its
result blocks), redacted thinking, signatures and citations stay in ``native``: the Message as the
non-streaming call returns it. Event types and delta types this module does not know are accepted and left
out, as the API asks of clients; a delta for a block that never started, already stopped or is of another
kind is rejected.
"""

from __future__ import annotations

from typing import Any, NoReturn

import orjson

from worker.choice import ChoiceState, CompletionState, ToolCallBuffer
from worker.dialects.base import Dialect, count, expect, optional, reject

STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "max_tokens": "length",
                "model_context_window_exceeded": "length", "tool_use": "tool_calls", "refusal": "content_filter"}
_STREAM_TYPES = frozenset({"text_delta", "thinking_delta", "input_json_delta"})
_EVENTS = frozenset({"message_start", "content_block_start", "content_block_delta", "content_block_stop",
                     "message_delta", "message_stop", "ping"})


# The delta type each kind of block streams its text in, and the delta's field that holds it.
_STREAMS = {"text": ("text_delta", "text"), "thinking": ("thinking_delta", "thinking"),
            "input": ("input_json_delta", "partial_json")}


class _Block:
    """One content block: its start as sent, and what its deltas added.

    ``target`` is where the block's pieces go in the shared state as well: the choice's content or reasoning
    parts, a tool call's arguments, or nowhere (a server tool's input stays in ``native``).
    """

    __slots__ = ("kind", "data", "parts", "signature", "citations", "call", "streams", "key", "target")

    def __init__(self, kind: str, data: dict[str, Any], call: ToolCallBuffer | None,
                 target: list[str] | None) -> None:
        self.kind = kind
        self.data = data
        self.parts: list[str] = []  # text, thinking or input JSON, as the deltas brought it
        self.signature: str | None = None
        self.citations: list[Any] = []
        self.call = call  # only for tool_use: the client's tools are the completion's tool calls
        # tool_use, server_tool_use and the like have an input, and stream it as JSON
        streams: tuple[str | None, str] = _STREAMS.get("input" if "input" in data else kind, (None, ""))
        self.streams, self.key = streams
        self.target = target

    @property
    def takes_input(self) -> bool:
        return self.key == "partial_json"


class AnthropicDialect(Dialect):
    """Folds Anthropic Messages stream events; ``native`` is the Message."""

    name = "anthropic"

    def __init__(self, state: CompletionState) -> None:
        super().__init__(state)
        self._choice: ChoiceState | None = None
        self._message: dict[str, Any] | None = None
        self._blocks: dict[int, _Block] = {}
        self._open: dict[int, _Block] = {}  # the blocks started and not yet stopped
        self._delta: dict[str, Any] = {}  # message_delta's stop_reason, stop_sequence and the like
        self._usage: dict[str, Any] = {}  # message_start's usage, updated by message_delta's

    @staticmethod
    def recognizes(event: dict[str, Any]) -> bool:
        kind = event.get("type")
        return type(kind) is str and (kind in _EVENTS or (kind == "error" and isinstance(event.get("error"), dict)))

    def apply(self, event: dict[str, Any], position: int) -> None:
        kind = event.get("type")
        if kind == "content_block_delta":  # nearly every event: handled here, without a further call
            index, delta = event.get("index"), event.get("delta")
            block = self._open.get(index) if type(index) is int else None
            if block is None or type(delta) is not dict:
                self._bad_delta(event, position)
            dkind = delta.get("type")
            if dkind == block.streams:  # the block's own text, thinking or input JSON
                piece = delta.get(block.key)
                if type(piece) is not str:
                    self._bad_delta(event, position)
                if piece:
                    block.parts.append(piece)
                    if block.target is not None:
                        block.target.append(piece)
            elif dkind == "signature_delta":
                signature = delta.get("signature")
                if type(signature) is not str or block.kind != "thinking":
                    self._bad_delta(event, position)
                block.signature = signature
            elif dkind == "citations_delta":
                citation = delta.get("citation")
                if type(citation) is not dict or block.kind != "text":
                    self._bad_delta(event, position)
                block.citations.append(citation)
            elif type(dkind) is not str or dkind in _STREAM_TYPES:  # another kind of block's delta
                self._bad_delta(event, position)
        elif kind == "content_block_start":
            self._block_start(event, position)
        elif kind == "content_block_stop":
            self._block_stop(event, position)
        elif kind == "message_start":
            self._message_start(event, position)
        elif kind == "message_delta":
            self._message_delta(event, position)
        elif kind == "message_stop":
            self._begin()
            self.state.final = True
        elif kind == "error":
            self._begin()
            self.state.fail(event)
        elif type(kind) is not str:
            reject(position, f"not an Anthropic stream event: it has no type ({_keys(event)})")

    # --- events ----------------------------------------------------------------------------------------

    def _begin(self) -> ChoiceState:
        """The stream's one choice; the first event applied (never one rejected) sets the state up for it."""
        choice = self._choice
        if choice is None:
            state = self.state
            state.final = False
            state.usage_map = chat_usage
            state.raw_usage = self._usage
            choice = self._choice = state.choice(0)
        return choice

    def _message_start(self, event: dict[str, Any], position: int) -> None:
        message = expect(event.get("message"), dict, position, "message", "an object")
        if self._message is not None:
            reject(position, "a second message_start")
        message_id = optional(message.get("id"), str, position, "message.id", "a string")
        model = optional(message.get("model"), str, position, "message.model", "a string")
        role = optional(message.get("role"), str, position, "message.role", "a string")
        usage = optional(message.get("usage"), dict, position, "message.usage", "an object")
        choice = self._begin()
        state = self.state
        self._message = message
        state.id = state.id or message_id or None
        state.model = state.model or model or None
        if role and choice.role is None:
            choice.role = role
        if usage:
            self._usage.update(usage)

    def _block_start(self, event: dict[str, Any], position: int) -> None:
        index = expect(event.get("index"), int, position, "index", "an integer")
        data = expect(event.get("content_block"), dict, position, "content_block", "an object")
        kind = expect(data.get("type"), str, position, "content_block.type", "a string")
        if index in self._blocks:
            reject(position, f"content_block_start for block {index}, which had started already")
        text = thinking = None
        if kind == "text":
            text = optional(data.get("text"), str, position, "content_block.text", "a string")
        elif kind == "thinking":
            thinking = optional(data.get("thinking"), str, position, "content_block.thinking", "a string")
            optional(data.get("signature"), str, position, "content_block.signature", "a string")
        elif kind == "tool_use":
            optional(data.get("id"), str, position, "content_block.id", "a string")
            optional(data.get("name"), str, position, "content_block.name", "a string")
        if "input" in data:
            optional(data["input"], dict, position, "content_block.input", "an object")
        choice = self._begin()
        call = target = None
        if kind == "tool_use":
            call = choice.open_call(data.get("id") or f"call_{index}", data.get("name") or "")
            target = call.arguments
        elif kind == "text" or kind == "thinking":
            field = choice.content if kind == "text" else choice.reasoning_content
            field.append(text or thinking or "")
            target = field.parts
        block = self._blocks[index] = self._open[index] = _Block(kind, data, call, target)
        if text or thinking:
            block.parts.append(text or thinking or "")

    def _block_stop(self, event: dict[str, Any], position: int) -> None:
        index = expect(event.get("index"), int, position, "index", "an integer")
        block = self._open.get(index)
        if block is None:
            reject(position, f"content_block_stop for block {index}, which "
                             f"{'never started' if index not in self._blocks else 'had stopped already'}")
        call = block.call
        whole = None
        if call is not None and not call.arguments:  # no input_json_delta: the start's input is the input
            try:
                whole = orjson.dumps(block.data.get("input") or {}).decode()
            except orjson.JSONEncodeError as exc:
                reject(position, f"the tool input of block {index} cannot be written as JSON ({exc})")
        del self._open[index]
        if call is not None:
            if whole is not None:
                call.arguments.append(whole)
            call.done = True

    def _message_delta(self, event: dict[str, Any], position: int) -> None:
        delta = optional(event.get("delta"), dict, position, "delta", "an object") or {}
        stop = optional(delta.get("stop_reason"), str, position, "delta.stop_reason", "a string")
        usage = optional(event.get("usage"), dict, position, "usage", "an object") or {}
        choice = self._begin()
        self._delta.update(delta)
        if stop is not None:
            choice.finish_reason = STOP_REASONS.get(stop, stop)
        for key, value in usage.items():
            if value is not None:  # counts left out (null) keep their message_start value
                self._usage[key] = value

    def _bad_delta(self, event: dict[str, Any], position: int) -> NoReturn:
        """Raise a ChunkError saying what is wrong with a content_block_delta."""
        index, delta = event.get("index"), event.get("delta")
        if type(index) is not int:
            reject(position, f"content_block_delta index must be an integer, got {index!r:.40}")
        block = self._open.get(index)
        if block is None:
            reject(position, f"content_block_delta for block {index}, which "
                             f"{'never started' if index not in self._blocks else 'had stopped already'}")
        if type(delta) is not dict:
            reject(position, f"content_block_delta delta must be an object, got {delta!r:.60}")
        reject(position, f"a {delta.get('type')!r:.40} delta cannot apply to block {index} ({block.kind}), "
                         f"or its value is not of the right type: {delta!r:.80}")

    # --- the Message ------------------------------------------------------------------------------------

    def native(self, warnings: list[str]) -> dict[str, Any] | None:
        if self._choice is None:
            return None
        message = dict(self._message or {"type": "message", "role": "assistant"})
        message["content"] = [_render(index, self._blocks[index], warnings) for index in sorted(self._blocks)]
        message.update(self._delta)
        message["usage"] = dict(self._usage)
        return message

    @staticmethod
    def native_usage(native: dict[str, Any]) -> dict[str, Any] | None:
        usage = native.get("usage")
        return usage if isinstance(usage, dict) else None


def _render(index: int, block: _Block, warnings: list[str]) -> dict[str, Any]:
    data = dict(block.data)
    kind, parts = block.kind, block.parts
    if kind == "text":
        data["text"] = "".join(parts)
        if block.citations:
            data["citations"] = [*(data.get("citations") or ()), *block.citations]
    elif kind == "thinking":
        data["thinking"] = "".join(parts)
        if block.signature is not None:
            data["signature"] = block.signature
    elif block.takes_input and parts:
        text = "".join(parts)
        try:
            data["input"] = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            if block.call is None:  # a tool call's arguments are checked with the completion's
                warnings.append(f"content block {index} ({kind}): input is not valid JSON ({exc}); "
                                "kept the input of its start")
    return data


def chat_usage(usage: dict[str, Any]) -> dict[str, Any] | None:
    """Anthropic usage in the chat shape: prompt_tokens counts cache reads and writes in, as OpenAI's does.

    Anthropic reports ``input_tokens`` apart from ``cache_read_input_tokens`` and
    ``cache_creation_input_tokens``; the split goes to ``prompt_tokens_details`` (``cached_tokens``,
    ``cache_write_tokens``). Anthropic sends no total: ``total_tokens`` is prompt + completion.
    """
    fresh, output = count(usage.get("input_tokens")), count(usage.get("output_tokens"))
    read, write = count(usage.get("cache_read_input_tokens")), count(usage.get("cache_creation_input_tokens"))
    if fresh is None and read is None and write is None and output is None:
        return None
    prompt = None if fresh is None and read is None and write is None else (fresh or 0) + (read or 0) + (write or 0)
    chat: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": output,
                            "total_tokens": None if prompt is None or output is None else prompt + output}
    details = {}
    if read is not None:
        details["cached_tokens"] = read
    if write is not None:
        details["cache_write_tokens"] = write
    if details:
        chat["prompt_tokens_details"] = details
    output_details = usage.get("output_tokens_details")
    thinking = count(output_details.get("thinking_tokens")) if isinstance(output_details, dict) else None
    if thinking is not None:
        chat["completion_tokens_details"] = {"reasoning_tokens": thinking}
    return chat


def _keys(event: dict[str, Any]) -> str:
    keys = ", ".join(map(str, list(event)[:6]))
    return f"keys {keys}" if keys else "an empty object"
