"""The seed streams transcribed from provider documentation: qwen-mt's two output modes and Doubao's tool calls."""

from __future__ import annotations

from typing import Any

from conftest import SEEDS, load_jsonl
from streamfold.contract import ResultRecord
from worker import assemble

QWEN_MT_USAGE = {
    "completion_tokens": 9,
    "prompt_tokens": 56,
    "total_tokens": 65,
    "completion_tokens_details": None,
    "prompt_tokens_details": None,
}
QWEN_MT_PLUS_TEXT = "I didn’t laugh after watching this video."
DOUBAO_ARGUMENTS = '{"prompt": "有道词典", "region": "CN"}'


def _only_message(record: ResultRecord) -> dict[str, Any]:
    choices = record["completion"]["choices"]
    assert [choice["index"] for choice in choices] == [0]
    message: dict[str, Any] = choices[0]["message"]
    return message


def test_qwen_mt_flash_incremental_stream_gives_the_sentence_once() -> None:
    lines = load_jsonl(SEEDS / "qwen_mt_flash_incremental.jsonl")
    record = assemble(lines)
    assert record["status"] == "completed"
    assert record["warnings"] == []
    assert record["metrics"]["chunks"] == 13
    completion = record["completion"]
    assert completion["id"] == "chatcmpl-d8aa6596-b366-4ed0-9f6d-2e89247f554e"
    assert completion["model"] == "qwen-mt-flash"
    assert completion["created"] == 1762504029
    assert completion["object"] == "chat.completion"
    assert "service_tier" not in completion
    assert "system_fingerprint" not in completion
    assert completion["usage"] == QWEN_MT_USAGE
    choice = completion["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["logprobs"] is None
    message = _only_message(record)
    assert message["role"] == "assistant"
    assert message["content"] == "I didn't laugh after watching this video."
    assert message["refusal"] is None
    assert message.get("tool_calls") is None
    assert message.get("function_call") is None


def test_qwen_mt_plus_cumulative_stream_is_recognised_in_auto_mode() -> None:
    record = assemble(load_jsonl(SEEDS / "qwen_mt_plus_cumulative.jsonl"))
    assert record["status"] == "completed"
    assert record["warnings"] == []
    message = _only_message(record)
    assert message["content"] == QWEN_MT_PLUS_TEXT
    assert message["role"] == "assistant"
    assert record["completion"]["choices"][0]["finish_reason"] == "stop"
    assert record["completion"]["usage"] == QWEN_MT_USAGE
    assert record["completion"]["model"] == "qwen-mt-plus"


def test_qwen_mt_plus_cumulative_stream_in_cumulative_mode_gives_the_last_text() -> None:
    record = assemble(load_jsonl(SEEDS / "qwen_mt_plus_cumulative.jsonl"), mode="cumulative")
    assert record["status"] == "completed"
    assert record["warnings"] == []
    assert _only_message(record)["content"] == QWEN_MT_PLUS_TEXT
    assert record["completion"]["usage"] == QWEN_MT_USAGE


def test_qwen_mt_plus_cumulative_stream_read_as_incremental_repeats_every_prefix() -> None:
    record = assemble(load_jsonl(SEEDS / "qwen_mt_plus_cumulative.jsonl"), mode="incremental")
    repeated = (
        "I"
        "I didn"
        "I didn’t"
        "I didn’t laugh"
        "I didn’t laugh after"
        "I didn’t laugh after watching"
        "I didn’t laugh after watching this"
        "I didn’t laugh after watching this video"
        "I didn’t laugh after watching this video."
        "I didn’t laugh after watching this video."
        "I didn’t laugh after watching this video."
    )
    assert _only_message(record)["content"] == repeated
    assert record["status"] == "completed"


def test_doubao_whole_tool_call_arrives_with_content_and_finish_reason() -> None:
    record = assemble(load_jsonl(SEEDS / "doubao_tool_call_whole.jsonl"))
    assert record["status"] == "completed"
    assert record["warnings"] == []
    completion = record["completion"]
    assert completion["id"] == "0217***"
    assert completion["created"] == 1737882725
    assert completion["model"] == "doubao-***"
    assert completion.get("usage") is None
    assert completion["choices"][0]["finish_reason"] == "tool_calls"
    message = _only_message(record)
    assert message["role"] == "assistant"
    assert message["content"] == "从前xxxx\n"
    assert message.get("function_call") is None
    assert message["tool_calls"] == [
        {
            "id": "call_leigeybrw25cwlk87byg8l3v",
            "type": "function",
            "function": {"name": "AppFinder", "arguments": DOUBAO_ARGUMENTS},
        }
    ]


def test_doubao_fragmented_tool_call_sets_id_and_name_once_and_joins_arguments() -> None:
    record = assemble(load_jsonl(SEEDS / "doubao_tool_call_fragments.jsonl"))
    assert record["status"] == "completed"
    assert record["warnings"] == []
    assert record["metrics"]["chunks"] == 10
    assert record["completion"]["choices"][0]["finish_reason"] == "tool_calls"
    assert record["completion"]["model"] == "doubao-1-5-***"
    message = _only_message(record)
    assert message["role"] == "assistant"
    assert message["content"] == "从前xxxx"
    assert message.get("function_call") is None
    assert message["tool_calls"] == [
        {"id": "call_05i***", "type": "function", "function": {"name": "AppFinder", "arguments": DOUBAO_ARGUMENTS}}
    ]
