"""A chat request as each native API's own request, checked against the official SDKs' request types."""

from __future__ import annotations

from typing import Any, get_type_hints

import pytest
from anthropic.types import ImageBlockParam, TextBlockParam, ToolParam, ToolResultBlockParam, ToolUseBlockParam
from anthropic.types.message_create_params import MessageCreateParamsStreaming
from openai.types.responses import EasyInputMessageParam, FunctionToolParam, ResponseFunctionToolCallParam
from openai.types.responses.response_create_params import ResponseCreateParamsStreaming
from openai.types.responses.response_input_param import FunctionCallOutput
from pydantic import TypeAdapter

from producer.gateway.translate import ANTHROPIC_MAX_TOKENS, native_body
from streamfold.errors import ConfigError

WEATHER: dict[str, Any] = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CONVERSATION: dict[str, Any] = {
    "model": "m", "temperature": 0.2, "max_tokens": 300, "stop": "END", "tools": [WEATHER], "tool_choice": "required",
    "user": "u-1", "logprobs": True,
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather here? "},
                                     {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
        {"role": "tool", "tool_call_id": "call_2", "content": "sun"},
        {"role": "user", "content": "Thanks"},
    ]}


def conforms(value: dict[str, Any], kind: Any) -> None:
    """``value`` is a ``kind`` (an SDK's request TypedDict): it validates, and it has no key the type lacks
    (pydantic ignores extra keys of a TypedDict, and the API would refuse them)."""
    TypeAdapter(kind).validate_python(value)
    assert set(value) <= set(get_type_hints(kind)), set(value) - set(get_type_hints(kind))


def test_a_chat_upstream_gets_the_body_unchanged() -> None:
    assert native_body("chat", CONVERSATION) is CONVERSATION


def test_anthropic_gets_alternating_turns_tool_results_and_a_valid_request() -> None:
    native = native_body("anthropic", CONVERSATION)
    conforms({**native, "stream": True}, MessageCreateParamsStreaming)
    blocks = {"text": TextBlockParam, "image": ImageBlockParam, "tool_use": ToolUseBlockParam,
              "tool_result": ToolResultBlockParam}
    for turn in native["messages"]:
        for block in turn["content"]:
            conforms(block, blocks[block["type"]])
    conforms(native["tools"][0], ToolParam)
    assert native["system"] == "Be brief."
    assert [turn["role"] for turn in native["messages"]] == ["user", "assistant", "user"]
    assert native["messages"][1]["content"] == [
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Oslo"}},
        {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"city": "Rome"}}]
    # Both results and the next question are one user turn: Anthropic wants the roles to alternate.
    assert [block["type"] for block in native["messages"][2]["content"]] == ["tool_result", "tool_result", "text"]
    assert native["messages"][0]["content"][1] == {"type": "image", "source": {"type": "url",
                                                                                "url": "https://example.com/a.png"}}
    assert (native["max_tokens"], native["stop_sequences"]) == (300, ["END"])
    assert native["tool_choice"] == {"type": "any"}
    assert native["tools"][0]["input_schema"] == WEATHER["function"]["parameters"]
    assert not {"logprobs", "user", "temperature"} & set(native)


def test_anthropic_gets_a_max_tokens_when_the_client_set_none() -> None:
    native = native_body("anthropic", {"model": "m", "messages": [{"role": "user", "content": "Hi"}]})
    assert native["max_tokens"] == ANTHROPIC_MAX_TOKENS
    assert native_body("anthropic", {"model": "m", "max_completion_tokens": 7, "messages": []})["max_tokens"] == 7


def test_responses_gets_input_items_with_calls_and_their_outputs() -> None:
    native = native_body("responses", CONVERSATION)
    conforms({**native, "stream": True}, ResponseCreateParamsStreaming)
    items = {"function_call": ResponseFunctionToolCallParam, "function_call_output": FunctionCallOutput}
    for item in native["input"]:
        conforms(item, items.get(item.get("type"), EasyInputMessageParam))
    conforms(native["tools"][0], FunctionToolParam)
    kinds = [item.get("type") or item["role"] for item in native["input"]]
    assert kinds == ["developer", "user", "function_call", "function_call", "function_call_output",
                     "function_call_output", "user"]
    assert native["input"][2] == {"type": "function_call", "call_id": "call_1", "name": "get_weather",
                                  "arguments": '{"city": "Oslo"}'}
    assert native["input"][4] == {"type": "function_call_output", "call_id": "call_1", "output": "rain"}
    assert native["max_output_tokens"] == 300
    assert native["tools"][0]["name"] == "get_weather" and native["tools"][0]["type"] == "function"


def test_gemini_gets_contents_function_responses_by_name_and_a_generation_config() -> None:
    native = native_body("gemini", CONVERSATION)
    assert native["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert [turn["role"] for turn in native["contents"]] == ["user", "model", "user"]
    assert native["contents"][1]["parts"] == [{"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}},
                                              {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}}]
    assert native["contents"][2]["parts"][:2] == [
        {"functionResponse": {"name": "get_weather", "response": {"content": "rain"}}},
        {"functionResponse": {"name": "get_weather", "response": {"content": "sun"}}}]
    assert native["generationConfig"] == {"maxOutputTokens": 300, "temperature": 0.2, "stopSequences": ["END"]}
    assert native["tools"] == [{"functionDeclarations": [{"name": "get_weather", "description": "Weather in a city",
                                                          "parameters": WEATHER["function"]["parameters"]}]}]


@pytest.mark.parametrize("api", ["anthropic", "gemini"])
def test_tool_call_arguments_that_are_not_json_are_refused_with_a_clear_error(api: str) -> None:
    body = {"model": "m", "messages": [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}
    with pytest.raises(ConfigError, match="arguments are not JSON"):
        native_body(api, body)


def test_an_api_without_a_translation_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="'bedrock'"):
        native_body("bedrock", {"model": "m", "messages": []})
