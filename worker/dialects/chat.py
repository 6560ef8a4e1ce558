"""OpenAI-compatible ``chat.completion.chunk`` streams: every provider's chunk dialect, on the hot path.

The rules, quirk by quirk, are in docs/assembly.md. Most chunks hold one choice whose delta carries only text
or tool-call fragments; those are read and checked in one pass (``_read_plain_choice``), everything else
takes the general path that checks the whole chunk first (``chunk_checks``).
"""

from __future__ import annotations

from typing import Any

from worker.choice import ChoiceState, CompletionState, merge_field
from worker.chunk_checks import META_TYPES, check_choices, check_tool_calls, check_top_level, meta_types_ok
from worker.dialects.base import Dialect

_TOP_LEVEL = frozenset({"choices", "usage", "error", "service_tier", "object", *META_TYPES})


class ChatDialect(Dialect):
    """Folds chat.completion.chunk objects; the completion is the native object, so ``native`` is None."""

    name = "chat"
    follows_mode = True

    def __init__(self, state: CompletionState) -> None:
        super().__init__(state)
        self._meta_missing = True

    @staticmethod
    def recognizes(event: dict[str, Any]) -> bool:
        return True  # the default: what no other dialect claims is read (and checked) as a chat chunk

    def apply(self, chunk: dict[str, Any], position: int) -> None:
        # Read and check everything first, mutate after: a rejected chunk must change nothing.
        state = self.state
        get = chunk.get
        choices, usage, error = get("choices"), get("usage"), get("error")
        fingerprint = get("system_fingerprint") if state.fingerprint is None else None
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

        if self._meta_missing:
            self._take_meta(chunk)
        if fingerprint:
            state.fingerprint = fingerprint
        if simple is not None:
            index, finish, content, role, reasoning_content, reasoning, refusal, tool_calls = simple
            choice = state.choices.get(index) or state.choice(index)
            if content is not None:
                choice.content.add(content)
            if role and choice.role is None:
                choice.role = role
            if reasoning_content is not None:
                choice.reasoning_content.add(reasoning_content)
            if reasoning is not None:
                choice.reasoning.add(reasoning)
            if refusal is not None:
                choice.refusal.add(refusal)
            if tool_calls is not None:
                for fragment in tool_calls:
                    choice.add_tool_call(fragment)
            if finish is not None:
                choice.finish_reason = finish
        elif choices:
            for item in choices:
                _apply_choice(state.choice(item.get("index") or 0), item)
        if usage is not None:
            state.raw_usage = usage
        if tier is not None:
            state.service_tier = tier
        if error is not None:
            state.fail(error)
        if extra is not None:
            for key, value in extra:
                merge_field(state.extra, key, value)

    def _take_meta(self, chunk: dict[str, Any]) -> None:
        """id, model, created: the first non-empty value of each."""
        state = self.state
        if state.id is None:
            state.id = chunk.get("id") or None
        if state.model is None:
            state.model = chunk.get("model") or None
        if state.created is None:
            state.created = chunk.get("created") or None
        # The fingerprint is looked for apart: many providers never send one.
        self._meta_missing = None in (state.id, state.model, state.created)


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
