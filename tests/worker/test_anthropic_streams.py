"""Anthropic Messages streams: every recorded stream, assembled and compared with what was read off it by hand,
and the dialect's rules (docs/assembly.md) one by one on small streams."""

from __future__ import annotations

import json
from typing import Any

import pytest

from native_streams import (block_delta, block_start, block_stop, clean_record, fixture_names,
                            message_end, message_start, native_events, snapshot, text_block, tool_block)
from streamfold.errors import ChunkError
from worker import Assembler, assemble

FIXTURES = {"anthropic_parallel_tool_use.jsonl", "anthropic_redacted_thinking.jsonl", "anthropic_text_basic.jsonl",
            "anthropic_thinking_signature.jsonl", "anthropic_thinking_then_tool_use_no_args.jsonl"}


def _record(name: str) -> dict[str, Any]:
    return clean_record("anthropic", name)


def _joined(name: str, kind: str, key: str) -> str:
    return "".join(event["delta"][key] for event in native_events("anthropic", name)
                   if event["type"] == "content_block_delta" and event["delta"]["type"] == kind)


def _call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def test_every_recorded_anthropic_stream_has_a_test_here() -> None:
    assert set(fixture_names("anthropic")) == FIXTURES


def test_text_basic_is_one_text_block_with_running_total_usage() -> None:
    record = _record("anthropic_text_basic.jsonl")
    text = ("Hello! I'm doing well, thank you for asking. How are you doing today? "
            "Is there anything I can help you with?")
    assert record["completion"] == {
        "id": "msg_01QC4g3HwBThD4BaNtBckFDJ", "object": "chat.completion", "created": 0,
        "model": "claude-sonnet-4-5-20250929",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                     "finish_reason": "stop", "logprobs": None}],
        # input 12 repeated by message_delta, output 30 the final total (not 1 + 30)
        "usage": {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42,
                  "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0}},
    }
    native = record["native"]
    assert native["content"] == [{"type": "text", "text": text}]
    assert native["stop_reason"] == "end_turn" and native["stop_sequence"] is None
    assert native["usage"] == {"input_tokens": 12, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                               "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
                               "output_tokens": 30, "service_tier": "standard", "inference_geo": "not_available"}


def test_parallel_tool_use_keeps_ids_and_joins_fragments_split_inside_keys() -> None:
    record = _record("anthropic_parallel_tool_use.jsonl")
    message = record["completion"]["choices"][0]["message"]
    assert message["content"] == _joined("anthropic_parallel_tool_use.jsonl", "text_delta", "text")
    assert message["tool_calls"] == [
        _call("toolu_014x5X91kx3fvdhpLvwXZWE2", "get_weather", '{"location": "San Francisco, CA", "unit": "celsius"}'),
        _call("toolu_0121kXsENLvoDZ72LCuAnCCz", "get_time", '{"timezone": "America/Los_Angeles"}'),
    ]
    assert record["completion"]["choices"][0]["finish_reason"] == "tool_calls"
    # The old usage shape: message_delta has only output_tokens; input comes from message_start.
    assert record["completion"]["usage"]["prompt_tokens"] == 506
    assert record["completion"]["usage"]["completion_tokens"] == 153
    assert [block["input"] for block in record["native"]["content"][1:]] == [
        {"location": "San Francisco, CA", "unit": "celsius"}, {"timezone": "America/Los_Angeles"}]


def test_thinking_goes_to_reasoning_content_and_its_signature_to_native() -> None:
    name = "anthropic_thinking_signature.jsonl"
    record = _record(name)
    message = record["completion"]["choices"][0]["message"]
    thinking = _joined(name, "thinking_delta", "thinking")
    assert thinking.startswith("The user wants two names for a pet pelican") and thinking.endswith("very short.")
    assert message == {"role": "assistant", "content": "- Captain\n- Scoop", "refusal": None,
                       "reasoning_content": thinking}
    signature = next(event["delta"]["signature"] for event in native_events("anthropic", name)
                     if event["type"] == "content_block_delta" and event["delta"]["type"] == "signature_delta")
    assert record["native"]["content"] == [{"type": "thinking", "thinking": thinking, "signature": signature},
                                           {"type": "text", "text": "- Captain\n- Scoop"}]
    assert record["completion"]["usage"]["completion_tokens"] == 84


def test_a_tool_without_arguments_gets_an_empty_object_and_keeps_its_extra_fields() -> None:
    record = _record("anthropic_thinking_then_tool_use_no_args.jsonl")
    message = record["completion"]["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [_call("toolu_01825dXWLSoJwCst1qTsiWdb", "fixed_version", "{}")]
    assert record["native"]["content"][1] == {"type": "tool_use", "id": "toolu_01825dXWLSoJwCst1qTsiWdb",
                                              "name": "fixed_version", "input": {}, "caller": {"type": "direct"}}
    assert record["native"]["stop_details"] is None
    assert record["completion"]["usage"]["completion_tokens_details"] == {"reasoning_tokens": 53}


def test_redacted_thinking_stays_in_native_and_usage_is_the_final_total() -> None:
    name = "anthropic_redacted_thinking.jsonl"
    record = _record(name)
    message = record["completion"]["choices"][0]["message"]
    assert "reasoning_content" not in message
    assert message["content"] == _joined(name, "text_delta", "text")
    starts = [event["content_block"] for event in native_events("anthropic", name)
              if event["type"] == "content_block_start"]
    assert record["native"]["content"][:2] == starts[:2]
    kinds = [block["type"] for block in record["native"]["content"]]
    assert kinds == ["redacted_thinking", "redacted_thinking", "text"]
    assert record["completion"]["usage"]["completion_tokens"] == 189  # 88 at the start already counted in


# --- the rules, on small streams ----------------------------------------------------------------------------

def test_running_totals_are_taken_and_input_tokens_may_change() -> None:
    events = [message_start({"input_tokens": 40, "output_tokens": 1}), *text_block(0, ["Hi"]),
              *message_end(usage={"input_tokens": 42, "output_tokens": 7})]
    usage = assemble(events)["completion"]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (42, 7, 49)


def test_prompt_tokens_count_cache_reads_and_writes_in_with_the_split_in_the_details() -> None:
    start = {"input_tokens": 5, "cache_read_input_tokens": 1000, "cache_creation_input_tokens": 200,
             "output_tokens": 1}
    record = assemble([message_start(start), *text_block(0, ["ok"]), *message_end(usage={"output_tokens": 3})])
    assert record["completion"]["usage"] == {
        "prompt_tokens": 1205, "completion_tokens": 3, "total_tokens": 1208,
        "prompt_tokens_details": {"cached_tokens": 1000, "cache_write_tokens": 200}}
    assert record["native"]["usage"] == {**start, "output_tokens": 3}


@pytest.mark.parametrize(("stop_reason", "finish_reason"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"),
    ("refusal", "content_filter"), ("pause_turn", "stop"), ("model_context_window_exceeded", "length"),
    ("a_future_reason", "a_future_reason")])
def test_stop_reasons_are_mapped_to_finish_reasons(stop_reason: str, finish_reason: str) -> None:
    record = assemble([message_start(), *text_block(0, ["x"]), *message_end(stop_reason)])
    assert record["completion"]["choices"][0]["finish_reason"] == finish_reason
    assert record["native"]["stop_reason"] == stop_reason


def test_text_blocks_split_by_citations_are_joined_and_the_citations_kept_in_native() -> None:
    citation = {"type": "char_location", "cited_text": "The grass is green.", "document_index": 0,
                "start_char_index": 0, "end_char_index": 20}
    events = [message_start(), *text_block(0, ["According to the document, "]),
              block_start(1, {"type": "text", "text": "", "citations": []}),
              block_delta(1, {"type": "citations_delta", "citation": citation}),
              block_delta(1, {"type": "text_delta", "text": "the grass is green"}), block_stop(1),
              *text_block(2, ["."]), *message_end()]
    record = assemble(events)
    assert record["completion"]["choices"][0]["message"]["content"] == "According to the document, the grass is green."
    assert record["native"]["content"][1] == {"type": "text", "text": "the grass is green", "citations": [citation]}


def test_server_tools_stay_in_native_and_out_of_tool_calls() -> None:
    result = {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1",
              "content": [{"type": "web_search_result", "url": "https://example.com", "title": "Example"}]}
    events = [message_start(), *tool_block(0, "srvtoolu_1", "web_search", ['{"query": ', '"weather"}'],
                                           kind="server_tool_use"),
              block_start(1, result), block_stop(1), *text_block(2, ["Sunny."]), *message_end()]
    record = assemble(events)
    message = record["completion"]["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "Sunny.", "refusal": None}
    assert record["completion"]["choices"][0]["finish_reason"] == "stop"
    assert record["native"]["content"][:2] == [
        {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "weather"}}, result]


def test_an_error_event_fails_the_stream_and_keeps_what_came_before() -> None:
    events = [message_start(), *text_block(0, ["partial"]),
              {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}]
    record = assemble(events)
    assert record["status"] == "failed"
    assert record["error"] == {"message": "Overloaded", "type": "overloaded_error", "code": None, "status": None}
    assert record["completion"]["choices"][0]["message"]["content"] == "partial"


def test_an_sse_error_event_fails_the_stream() -> None:
    lines = ["event: message_start", "data: " + json.dumps(message_start()), "",
             "event: error", 'data: {"type": "error", "error": {"type": "api_error", "message": "boom"}}', ""]
    record = assemble(lines)
    assert record["format"] == "anthropic"
    assert record["status"] == "failed" and record["error"]["message"] == "boom"


def test_a_stream_without_message_stop_is_incomplete_even_with_its_stop_reason() -> None:
    events = [message_start(), *text_block(0, ["cut"]), *message_end()[:1]]
    record = assemble(events)
    assert record["status"] == "incomplete"
    assert record["completion"]["choices"][0]["finish_reason"] == "stop"


def test_a_tool_call_cut_mid_arguments_is_kept_with_a_warning() -> None:
    record = assemble([message_start(), block_start(0, {"type": "tool_use", "id": "t1", "name": "f", "input": {}}),
                       block_delta(0, {"type": "input_json_delta", "partial_json": '{"a": '})])
    assert record["status"] == "incomplete"
    call = record["completion"]["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["arguments"] == '{"a": '
    assert record["native"]["content"][0]["input"] == {}
    assert len(record["warnings"]) == 1 and "not valid JSON" in record["warnings"][0]


def test_unknown_event_and_delta_types_are_accepted_and_left_out() -> None:
    events = [message_start(), {"type": "a_future_event", "data": 1}, *text_block(0, ["a"]), *message_end()]
    events.insert(3, block_delta(0, {"type": "a_future_delta", "x": 1}))
    record = assemble(events)
    assert record["status"] == "completed" and record["metrics"]["chunks"] == len(events)
    assert record["completion"]["choices"][0]["message"]["content"] == "a"


@pytest.mark.parametrize(("event", "reason"), [
    (block_delta(5, {"type": "text_delta", "text": "x"}), "block 5, which never started"),
    (block_delta(0, {"type": "input_json_delta", "partial_json": "{"}), r"cannot apply to block 0 \(text\)"),
    (block_delta(0, {"type": "text_delta", "text": 5}), r"cannot apply to block 0 \(text\)"),
    (block_delta(0, {"type": "signature_delta", "signature": "s"}), r"cannot apply to block 0 \(text\)"),
    (block_delta("0", {"type": "text_delta", "text": "x"}), "index must be an integer"),
    (block_delta(0, ["text_delta"]), "delta must be an object"),
    (block_start(0, {"type": "text", "text": ""}), "block 0, which had started already"),
    (block_stop(3), "block 3, which never started"),
    (message_start(), "a second message_start"),
    ({"type": "message_delta", "delta": {"stop_reason": 7}}, "delta.stop_reason must be a string"),
    ({"no": "type"}, "not an Anthropic stream event"),
])
def test_a_rejected_event_names_what_is_wrong_and_changes_nothing(event: dict[str, Any], reason: str) -> None:
    assembler = Assembler(format="anthropic")
    for item in [message_start(), block_start(0, {"type": "text", "text": ""}),
                 block_delta(0, {"type": "text_delta", "text": "kept"})]:
        assembler.feed(item)
    before = snapshot(assembler)
    with pytest.raises(ChunkError, match=reason) as caught:
        assembler.feed(event)
    assert caught.value.position == 3
    assert snapshot(assembler) == before


def test_a_delta_after_its_blocks_stop_is_rejected() -> None:
    assembler = Assembler()
    for event in [message_start(), *text_block(0, ["a"])]:
        assembler.feed(event)
    with pytest.raises(ChunkError, match="had stopped already"):
        assembler.feed(block_delta(0, {"type": "text_delta", "text": "b"}))


def test_a_follower_sees_text_and_arguments_only_grow_and_calls_done_when_their_block_stops() -> None:
    events = [message_start(), *tool_block(0, "t1", "f", ["", '{"a"', ": 1}"]), *text_block(1, ["x", "y"]),
              *tool_block(2, "t2", "g", []), *message_end("tool_use")]
    assembler = Assembler()
    seen: list[tuple[list[str], list[list[str]], list[bool]]] = []
    for event in events:
        assembler.feed(event)
        choices = assembler.state.choices
        if choices:
            choice = choices[0]
            seen.append((list(choice.content.parts), [list(call.arguments) for call in choice.calls],
                         [call.done for call in choice.calls]))
    for (text, arguments, done), (later_text, later_arguments, later_done) in zip(seen, seen[1:]):
        assert later_text[:len(text)] == text
        assert len(later_arguments) >= len(arguments)
        for position, parts in enumerate(arguments):
            assert later_arguments[position][:len(parts)] == parts
            assert not done[position] or later_arguments[position] == parts  # nothing after done
            assert later_done[position] or not done[position]
    # each call is done exactly at its content_block_stop: t1 at event 5 (seen from message_start on)
    assert [done for _, _, done in seen].index([True]) == 5
    assert seen[-1][1] == [['{"a"', ": 1}"], ["{}"]] and seen[-1][2] == [True, True]
    assert assembler.state.usage() == {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}
