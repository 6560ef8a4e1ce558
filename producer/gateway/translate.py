"""An OpenAI chat request body as the body of the upstream's own API, for calls the gateway routes to a native
upstream (an entry of ``STREAMFOLD_UPSTREAMS`` whose ``api`` is ``anthropic``, ``responses`` or ``gemini``).

Gateway clients speak chat completions; a native API wants its own request. What is translated: the messages
(system, user, assistant with its tool calls, tool results; text and image-URL parts), the generation
parameters (``max_tokens``/``max_completion_tokens``, ``stop``, and ``temperature``/``top_p`` where the API still
has them: the Messages API no longer does) and function tools with ``tool_choice``. Anything else a client sends that the native API has no name for is
left out rather than sent where it would be refused. A chat upstream gets the body unchanged.
"""

from __future__ import annotations

from typing import Any

import orjson

from streamfold.errors import ConfigError

# Anthropic refuses a request without max_tokens; a client that sets none gets this many.
ANTHROPIC_MAX_TOKENS = 4096
_SAMPLING = ("temperature", "top_p")


def native_body(api: str, body: dict[str, Any]) -> dict[str, Any]:
    """``body`` (an OpenAI chat request) for ``api``; ConfigError for a message the API cannot take."""
    if api == "chat":
        return body
    messages = [message for message in body.get("messages") or [] if isinstance(message, dict)]
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    tools = [tool["function"] for tool in body.get("tools") or []
             if isinstance(tool, dict) and tool.get("type") == "function" and isinstance(tool.get("function"), dict)]
    if api == "anthropic":
        return _anthropic(body, messages, limit, stops, tools)
    if api == "responses":
        return _responses(body, messages, limit, tools)
    if api == "gemini":
        return _gemini(body, messages, limit, stops, tools)
    raise ConfigError(f"no translation of a chat request to the {api!r} API")


def _anthropic(body: dict[str, Any], messages: list[dict[str, Any]], limit: Any, stops: list[str],
               tools: list[dict[str, Any]]) -> dict[str, Any]:
    system = "\n\n".join(_text(message.get("content")) for message in messages if message.get("role") in
                         ("system", "developer"))
    turns: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role == "tool":
            block = {"type": "tool_result", "tool_use_id": message.get("tool_call_id"),
                     "content": _text(message.get("content"))}
            _append_turn(turns, "user", [block])
        elif role in ("user", "assistant"):
            blocks = _anthropic_parts(message.get("content"))
            for call in message.get("tool_calls") or []:
                function = call.get("function") or {}
                blocks.append({"type": "tool_use", "id": call.get("id"), "name": function.get("name"),
                               "input": _json_object(function.get("arguments"))})
            _append_turn(turns, role, blocks)
    native: dict[str, Any] = {"model": body["model"], "messages": turns,
                              "max_tokens": int(limit) if isinstance(limit, int) else ANTHROPIC_MAX_TOKENS}
    if system:
        native["system"] = system
    if stops:
        native["stop_sequences"] = stops
    if tools:
        native["tools"] = [{"name": tool.get("name"), "description": tool.get("description", ""),
                            "input_schema": tool.get("parameters") or {"type": "object", "properties": {}}}
                           for tool in tools]
        choice = body.get("tool_choice")
        if choice == "required":
            native["tool_choice"] = {"type": "any"}
        elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
            native["tool_choice"] = {"type": "tool", "name": choice["function"].get("name")}
    return native


def _responses(body: dict[str, Any], messages: list[dict[str, Any]], limit: Any,
               tools: list[dict[str, Any]]) -> dict[str, Any]:
    items: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role == "tool":
            items.append({"type": "function_call_output", "call_id": message.get("tool_call_id"),
                          "output": _text(message.get("content"))})
            continue
        if message.get("content") is not None:
            items.append({"role": "developer" if role == "system" else role, "content": _text(message["content"])})
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {}
            items.append({"type": "function_call", "call_id": call.get("id"), "name": function.get("name"),
                          "arguments": function.get("arguments") or "{}"})
    native: dict[str, Any] = {"model": body["model"], "input": items}
    if isinstance(limit, int):
        native["max_output_tokens"] = limit
    native.update({name: body[name] for name in _SAMPLING if body.get(name) is not None})
    if tools:
        # Responses makes a function strict unless told; chat's default is not strict.
        native["tools"] = [{"type": "function", "name": tool.get("name"), "description": tool.get("description", ""),
                            "parameters": tool.get("parameters") or {"type": "object", "properties": {}},
                            "strict": bool(tool.get("strict"))}
                           for tool in tools]
    return native


def _gemini(body: dict[str, Any], messages: list[dict[str, Any]], limit: Any, stops: list[str],
            tools: list[dict[str, Any]]) -> dict[str, Any]:
    system = "\n\n".join(_text(message.get("content")) for message in messages if message.get("role") in
                         ("system", "developer"))
    names = {call.get("id"): (call.get("function") or {}).get("name") for message in messages
             for call in message.get("tool_calls") or []}
    contents: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role == "tool":
            response = {"name": names.get(message.get("tool_call_id")) or "tool",
                        "response": {"content": _text(message.get("content"))}}
            _append_turn(contents, "user", [{"functionResponse": response}], key="parts")
        elif role in ("user", "assistant"):
            parts: list[dict[str, Any]] = [{"text": text} for text in [_text(message.get("content"))] if text]
            parts += [{"functionCall": {"name": (call.get("function") or {}).get("name"),
                                        "args": _json_object((call.get("function") or {}).get("arguments"))}}
                      for call in message.get("tool_calls") or []]
            _append_turn(contents, "model" if role == "assistant" else "user", parts, key="parts")
    native: dict[str, Any] = {"model": body["model"], "contents": contents}
    if system:
        native["systemInstruction"] = {"parts": [{"text": system}]}
    config = {"maxOutputTokens": limit if isinstance(limit, int) else None, "temperature": body.get("temperature"),
              "topP": body.get("top_p"), "stopSequences": stops or None}
    if any(value is not None for value in config.values()):
        native["generationConfig"] = {name: value for name, value in config.items() if value is not None}
    if tools:
        native["tools"] = [{"functionDeclarations": [
            {"name": tool.get("name"), "description": tool.get("description", ""),
             **({"parameters": tool["parameters"]} if tool.get("parameters") else {})} for tool in tools]}]
    return native


def _append_turn(turns: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]], *, key: str = "content") -> None:
    """Native APIs want user and assistant turns to alternate: blocks of the same role join one turn."""
    if not blocks:
        return
    if turns and turns[-1]["role"] == role:
        turns[-1][key].extend(blocks)
    else:
        turns.append({"role": role, key: list(blocks)})


def _anthropic_parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for part in content or []:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text":
            blocks.append({"type": "text", "text": part.get("text", "")})
        elif part.get("type") == "image_url":
            url = (part.get("image_url") or {}).get("url", "")
            blocks.append({"type": "image", "source": {"type": "url", "url": url}})
    return blocks


def _text(content: Any) -> str:
    """A message's text: the string, or its text parts joined."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content or [] if isinstance(part, dict)
                   and part.get("type") == "text")


def _json_object(arguments: Any) -> dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    try:
        value = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        raise ConfigError("a tool call's arguments are not JSON; a native API takes them as an object") from None
    return value if isinstance(value, dict) else {"value": value}
