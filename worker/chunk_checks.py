"""Type checks for one chat.completion.chunk, run before any of it is applied.

Checking first and applying second is what lets a rejected chunk leave the Assembler untouched. The checks
cover exactly the fields the Assembler reads; unknown fields are kept as they are and never checked.
``fail`` is how every dialect's checks name what is wrong.
"""

from __future__ import annotations

from typing import Any, NoReturn

import orjson

from streamfold.errors import ChunkError

_STR_OR_NONE = (str, type(None))
_DELTA_TEXT = ("role", "refusal", "reasoning_content", "reasoning")
_DELTA_FIELDS = frozenset(("content", "tool_calls", "function_call", *_DELTA_TEXT))
_NOT_STR = {"tool_calls": "a list", "function_call": "an object"}
# The chunk's own fields the Assembler reads while it still looks for them, and their types.
META_TYPES: dict[str, type] = {"id": str, "model": str, "created": int, "system_fingerprint": str}
_TYPE_NAMES = {str: "a string", int: "an integer"}


def meta_types_ok(chunk: dict[str, Any]) -> bool:
    """id, model, created and system_fingerprint, when present, are of the types they are read as."""
    for key, expected in META_TYPES.items():
        value = chunk.get(key)
        if value is not None and type(value) is not expected:
            return False
    return True


def check_top_level(chunk: dict[str, Any], position: int) -> None:
    """Check the fields of a chunk outside its choices."""
    if "choices" not in chunk and "usage" not in chunk and "error" not in chunk:
        raise ChunkError("not a chat.completion.chunk: it has no choices, usage or error", position)
    choices = chunk.get("choices")
    if choices is not None and type(choices) is not list:
        fail(position, "choices", "a list", choices)
    for key, expected in META_TYPES.items():
        value = chunk.get(key)
        if value is not None and type(value) is not expected:
            fail(position, key, _TYPE_NAMES[expected], value)
    usage = chunk.get("usage")
    if usage is not None and type(usage) is not dict:
        fail(position, "usage", "an object", usage)
    error = chunk.get("error")
    if error is not None and not isinstance(error, (dict, str)):
        fail(position, "error", "an object or a string", error)


def check_choices(choices: list[Any], position: int) -> None:
    """Check every choice of a chunk; the common shapes cost one pass over a few keys."""
    for number, choice in enumerate(choices):
        if type(choice) is not dict:
            fail(position, f"choices[{number}]", "an object", choice)
        for key, value in choice.items():
            if value is None:
                continue
            if key == "delta":
                if type(value) is not dict:
                    fail(position, f"choices[{number}].delta", "an object", value)
                for field, item in value.items():
                    if item is None:
                        continue
                    if type(item) is str:
                        if field in _NOT_STR:
                            fail(position, f"choices[{number}].delta.{field}", _NOT_STR[field], item)
                    elif field in _DELTA_FIELDS:
                        _check_delta(value, position, number)
                        break
            elif key == "index":
                if type(value) is not int:
                    fail(position, f"choices[{number}].index", "an integer", value)
            elif key == "finish_reason":
                if type(value) is not str:
                    fail(position, f"choices[{number}].finish_reason", "a string", value)
            elif key == "logprobs":
                _check_logprobs(value, position, number)


def check_tool_calls(tool_calls: list[Any], position: int) -> None:
    """Check the tool-call fragments of a chunk's only choice, whose other fields are already known good."""
    for number, fragment in enumerate(tool_calls):
        _check_tool_call(fragment, position, 0, number)


def _check_logprobs(logprobs: Any, position: int, choice: int) -> None:
    if type(logprobs) is not dict:
        fail(position, f"choices[{choice}].logprobs", "an object", logprobs)
    for key in ("content", "refusal"):
        value = logprobs.get(key)
        if value is not None and type(value) is not list:
            fail(position, f"choices[{choice}].logprobs.{key}", "a list", value)


def _check_delta(delta: dict[str, Any], position: int, choice: int) -> None:
    content = delta.get("content")
    if content is not None and type(content) is not str:
        if type(content) is not list:
            fail(position, f"choices[{choice}].delta.content", "a string or a list of parts", content)
        for number, part in enumerate(content):
            _check_part(part, position, f"choices[{choice}].delta.content[{number}]")
    for key in _DELTA_TEXT:
        value = delta.get(key)
        if value is not None and type(value) is not str:
            fail(position, f"choices[{choice}].delta.{key}", "a string", value)
    tool_calls = delta.get("tool_calls")
    if tool_calls is not None:
        if type(tool_calls) is not list:
            fail(position, f"choices[{choice}].delta.tool_calls", "a list", tool_calls)
        for number, fragment in enumerate(tool_calls):
            _check_tool_call(fragment, position, choice, number)
    function_call = delta.get("function_call")
    if function_call is not None:
        if type(function_call) is not dict:
            fail(position, f"choices[{choice}].delta.function_call", "an object", function_call)
        for key in ("name", "arguments"):
            if not isinstance(function_call.get(key), _STR_OR_NONE):
                fail(position, f"choices[{choice}].delta.function_call.{key}", "a string", function_call.get(key))


def _check_part(part: Any, position: int, where: str) -> None:
    if type(part) is not dict:
        fail(position, where, "an object", part)
    kind = part.get("type")
    if kind == "text" and not isinstance(part.get("text"), _STR_OR_NONE):
        fail(position, f"{where}.text", "a string", part.get("text"))
    if kind == "thinking":
        thinking = part.get("thinking")
        if isinstance(thinking, list):
            for number, inner in enumerate(thinking):
                if type(inner) is not dict or not isinstance(inner.get("text"), _STR_OR_NONE):
                    fail(position, f"{where}.thinking[{number}]", "a text part", inner)
        elif not isinstance(thinking, _STR_OR_NONE):
            fail(position, f"{where}.thinking", "a string or a list of parts", thinking)


def _check_tool_call(fragment: Any, position: int, choice: int, number: int) -> None:
    if type(fragment) is not dict:
        fail(position, _call_field(choice, number, ""), "an object", fragment)
    index = fragment.get("index")
    if index is not None and type(index) is not int:
        fail(position, _call_field(choice, number, ".index"), "an integer", index)
    for key in ("id", "type"):
        if not isinstance(fragment.get(key), _STR_OR_NONE):
            fail(position, _call_field(choice, number, f".{key}"), "a string", fragment.get(key))
    function = fragment.get("function")
    if function is not None:
        if type(function) is not dict:
            fail(position, _call_field(choice, number, ".function"), "an object", function)
        if not isinstance(function.get("name"), _STR_OR_NONE):
            fail(position, _call_field(choice, number, ".function.name"), "a string", function.get("name"))
        arguments = function.get("arguments")
        if arguments is not None and not isinstance(arguments, (str, dict, list)):
            fail(position, _call_field(choice, number, ".function.arguments"), "a string or an object", arguments)
        if isinstance(arguments, (dict, list)):
            try:  # an object is kept as its JSON text, so it must be one orjson can write
                orjson.dumps(arguments)
            except orjson.JSONEncodeError as exc:
                fail(position, _call_field(choice, number, ".function.arguments"), f"writable as JSON ({exc})",
                     arguments)


def _call_field(choice: int, number: int, rest: str) -> str:
    # Field paths are spelled out only on failure, not for every fragment checked.
    return f"choices[{choice}].delta.tool_calls[{number}]{rest}"


def fail(position: int, field: str, expected: str, value: Any) -> NoReturn:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:80] + "..."
    raise ChunkError(f"{field} must be {expected}, got {type(value).__name__} {shown}", position)
