"""OpenAI Responses streams: every recorded stream, assembled and compared with what was read off it by hand,
and the dialect's rules (docs/assembly.md) one by one on small streams."""

from __future__ import annotations

from typing import Any

import pytest

from native_streams import (call_events, call_item, clean_record, fixture_names, message_events,
                            message_item, native_events, response_event, responses_usage, snapshot)
from streamfold.errors import ChunkError
from worker import Assembler, assemble

FIXTURES = {"responses_function_call.jsonl", "responses_reasoning_summary_multipart_text.jsonl",
            "responses_reasoning_summary_then_function_call.jsonl", "responses_text_basic.jsonl",
            "responses_text_then_function_call_phase.jsonl", "responses_web_search_annotations.jsonl"}
CREATED = response_event("response.created")


def _record(name: str) -> dict[str, Any]:
    record = clean_record("responses", name)
    # the final event's response is the native object, as the API returns it
    assert record["native"] == native_events("responses", name)[-1]["response"]
    return dict(record)


def _deltas(name: str, kind: str, **where: int) -> list[str]:
    return [event["delta"] for event in native_events("responses", name) if event["type"] == kind
            and all(event.get(key) == value for key, value in where.items())]


def _call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _usage(prompt: int, completion: int, total: int, reasoning: int, **prompt_details: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total,
            "prompt_tokens_details": {**prompt_details, "cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": reasoning}}


def test_every_recorded_responses_stream_has_a_test_here() -> None:
    assert set(fixture_names("responses")) == FIXTURES


def test_text_basic_is_one_message_with_usage_from_the_completed_event() -> None:
    record = _record("responses_text_basic.jsonl")
    assert record["completion"] == {
        "id": "resp_67e554a21aa88191b65876ac5e5bbe0406c52f0e511c76ed", "object": "chat.completion",
        "created": 1743082658, "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "The capital of France is Paris.",
                                             "refusal": None}, "finish_reason": "stop", "logprobs": None}],
        "usage": _usage(278, 9, 287, 0),
    }


def test_a_function_call_takes_its_call_id_and_the_finish_reason_tool_calls() -> None:
    record = _record("responses_function_call.jsonl")
    choice = record["completion"]["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
        _call("call_kL0PCQV7M2WMoVX8V8OtYSAL", "get_capital", '{"country":"France"}')]}
    assert choice["finish_reason"] == "tool_calls"


def test_reasoning_summary_parts_are_paragraphs_of_reasoning_content() -> None:
    name = "responses_reasoning_summary_multipart_text.jsonl"
    record = _record(name)
    message = record["completion"]["choices"][0]["message"]
    summaries = ["".join(_deltas(name, "response.reasoning_summary_text.delta", summary_index=index))
                 for index in range(4)]
    assert all(summaries) and summaries[1].startswith("**Explaining street crossing safety**")
    assert message["reasoning_content"] == "\n\n".join(summaries)
    assert message["content"] == "".join(_deltas(name, "response.output_text.delta"))
    assert record["completion"]["usage"] == _usage(13, 1680, 1693, 1408)


def test_reasoning_then_a_function_call() -> None:
    name = "responses_reasoning_summary_then_function_call.jsonl"
    record = _record(name)
    message = record["completion"]["choices"][0]["message"]
    assert message["reasoning_content"] == "".join(_deltas(name, "response.reasoning_summary_text.delta"))
    assert message["tool_calls"] == [_call("call_AB6AaRZ1FYZB2RwS6A5vbdqn", "calculator", '{"a":12,"b":7,"op":"add"}')]
    assert record["completion"]["service_tier"] == "default"  # the last response's: "auto" when it began


def test_commentary_then_a_function_call_with_cache_write_tokens() -> None:
    record = _record("responses_text_then_function_call_phase.jsonl")
    message = record["completion"]["choices"][0]["message"]
    assert message["content"] == "I’ll check the capital lookup tool for “PotatoLand.”"
    assert "reasoning_content" not in message  # encrypted reasoning only
    assert message["tool_calls"] == [_call("call_LabG58Uhrq9kZvR52BYKjToD", "get_capital",
                                           '{"country":"PotatoLand"}')]
    assert record["completion"]["usage"] == _usage(63, 69, 132, 26, cache_write_tokens=0)


def test_web_search_calls_stay_in_native_with_the_annotations() -> None:
    record = _record("responses_web_search_annotations.jsonl")
    message = record["completion"]["choices"][0]["message"]
    assert "tool_calls" not in message
    assert message["content"] == "".join(_deltas("responses_web_search_annotations.jsonl",
                                                 "response.output_text.delta"))
    output = record["native"]["output"]
    assert [item["type"] for item in output] == ["web_search_call", "web_search_call", "message"]
    assert output[2]["content"][0]["annotations"][0]["type"] == "url_citation"


# --- the rules, on small streams ----------------------------------------------------------------------------

def _completed(output: list[Any], usage: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return response_event("response.completed", "completed", output, **{"usage": usage or responses_usage(),
                                                                         **extra})


def test_usage_comes_only_with_the_final_event() -> None:
    events = [CREATED, *message_events(0, "msg_1", ["Hel", "lo"])]
    assert assemble(events)["completion"]["usage"] is None
    assert assemble(events)["status"] == "incomplete"
    usage = assemble([*events, _completed([message_item("msg_1", "Hello")])])["completion"]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (10, 5, 15)


@pytest.mark.parametrize(("reason", "finish_reason"), [("max_output_tokens", "length"),
                                                       ("content_filter", "content_filter")])
def test_an_incomplete_response_finishes_with_the_reason_mapped(reason: str, finish_reason: str) -> None:
    final = response_event("response.incomplete", "incomplete", [message_item("msg_1", "Hel")],
                           incomplete_details={"reason": reason}, usage=responses_usage())
    record = assemble([CREATED, *message_events(0, "msg_1", ["Hel"]), final])
    assert record["status"] == "completed"  # the stream ended as the API meant it to
    assert record["completion"]["choices"][0]["finish_reason"] == finish_reason


def test_a_failed_response_fails_with_its_error_and_keeps_the_output() -> None:
    failed = response_event("response.failed", "failed", error={"code": "server_error", "message": "It broke"})
    record = assemble([CREATED, *message_events(0, "msg_1", ["part"]), failed])
    assert record["status"] == "failed"
    assert record["error"] == {"message": "It broke", "type": "upstream_error", "code": "server_error", "status": None}
    assert record["completion"]["choices"][0]["message"]["content"] == "part"


def test_an_error_event_fails_the_stream() -> None:
    error = {"type": "error", "code": "rate_limit_exceeded", "message": "Slow down", "param": None}
    record = assemble([CREATED, error])
    assert record["status"] == "failed"
    assert record["error"] == {"message": "Slow down", "type": "upstream_error", "code": "rate_limit_exceeded",
                               "status": None}


def test_a_cut_stream_is_incomplete_and_native_is_the_output_so_far() -> None:
    events = [CREATED, *message_events(0, "msg_1", ["a", "b"])[:3], *call_events(1, "fc_1", "call_1", "f",
                                                                                   ['{"x"', ": 1}"])[:2]]
    record = assemble(events)
    assert record["status"] == "incomplete"
    assert record["completion"]["choices"][0]["finish_reason"] is None
    assert record["native"]["status"] == "in_progress"
    assert record["native"]["output"] == [
        {**message_item("msg_1"), "content": [{"type": "output_text", "text": "a", "annotations": []}]},
        call_item("fc_1", "call_1", "f", '{"x"')]


def test_done_events_fill_in_what_the_deltas_missed_and_a_mismatch_is_kept_with_a_warning() -> None:
    where = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    added = {"type": "response.output_item.added", "output_index": 0, "item": message_item("msg_1")}
    delta = {"type": "response.output_text.delta", **where, "delta": "Hel"}
    filled = assemble([CREATED, added, delta, {"type": "response.output_text.done", **where, "text": "Hello"}])
    assert filled["completion"]["choices"][0]["message"]["content"] == "Hello"
    assert filled["warnings"] == []
    differs = assemble([CREATED, added, delta, {"type": "response.output_text.done", **where, "text": "Bye"}])
    assert differs["completion"]["choices"][0]["message"]["content"] == "Hel"
    assert len(differs["warnings"]) == 1 and "differs" in differs["warnings"][0]


def test_a_final_response_without_output_gets_the_output_assembled_from_the_events() -> None:
    events = [CREATED, *message_events(0, "msg_1", ["Hi"]), *call_events(1, "fc_1", "call_1", "f", ["{}"])]
    final = _completed([])
    del final["response"]["output"]
    record = assemble([*events, final])
    assert record["native"]["output"] == [message_item("msg_1", "Hi"), call_item("fc_1", "call_1", "f", "{}",
                                                                                 "completed")]
    assert record["completion"]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_function_call_only_in_the_final_output_is_still_a_tool_call() -> None:
    final = _completed([call_item("fc_9", "call_9", "late", '{"a": 1}', "completed")])
    record = assemble([CREATED, final])
    message = record["completion"]["choices"][0]["message"]
    assert message["tool_calls"] == [_call("call_9", "late", '{"a": 1}')]
    assert record["completion"]["choices"][0]["finish_reason"] == "tool_calls"


def test_interleaved_function_calls_keep_their_own_arguments_in_the_order_they_began() -> None:
    first, second = call_events(0, "fc_a", "call_a", "f", ['{"a"', ": 1}"]), call_events(1, "fc_b", "call_b", "g",
                                                                                             ['{"b"', ": 2}"])
    events = [CREATED, first[0], second[0], first[1], second[1], second[2], first[2], *second[3:], *first[3:]]
    message = assemble(events)["completion"]["choices"][0]["message"]
    assert message["tool_calls"] == [_call("call_a", "f", '{"a": 1}'), _call("call_b", "g", '{"b": 2}')]


def test_a_refusal_goes_to_the_refusal_field_and_logprobs_to_the_choice() -> None:
    where = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    logprob = {"token": "No", "logprob": -0.1, "bytes": [78, 111], "top_logprobs": []}
    events = [CREATED, {"type": "response.output_item.added", "output_index": 0, "item": message_item("msg_1")},
              {"type": "response.content_part.added", **where, "part": {"type": "refusal", "refusal": ""}},
              {"type": "response.refusal.delta", **where, "delta": "No."},
              {"type": "response.content_part.added", **{**where, "content_index": 1},
               "part": {"type": "output_text", "text": "", "annotations": []}},
              {"type": "response.output_text.delta", **{**where, "content_index": 1}, "delta": "No",
               "logprobs": [logprob]}]
    choice = assemble(events)["completion"]["choices"][0]
    assert choice["message"]["refusal"] == "No." and choice["message"]["content"] == "No"
    assert choice["logprobs"] == {"content": [logprob], "refusal": None}


@pytest.mark.parametrize(("event", "reason"), [
    ({"type": "response.output_text.delta", "output_index": 7, "content_index": 0, "delta": "x"},
     "output 7, which was never added"),
    ({"type": "response.function_call_arguments.delta", "output_index": 0, "delta": "x"},
     "which is a message, not a function_call"),
    ({"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "delta": 3},
     "delta must be a string"),
    ({"type": "response.output_item.added", "output_index": 0, "item": message_item("msg_2")},
     "output 0, which was added already"),
    (response_event("response.in_progress", id="resp_other"), "in the stream of resp_test"),
    ({"type": 5}, "not a Responses stream event"),
])
def test_a_rejected_event_names_what_is_wrong_and_changes_nothing(event: dict[str, Any], reason: str) -> None:
    assembler = Assembler(format="responses")
    for item in [CREATED, *message_events(0, "msg_1", ["kept"])[:3]]:
        assembler.feed(item)
    before = snapshot(assembler)
    with pytest.raises(ChunkError, match=reason):
        assembler.feed(event)
    assert snapshot(assembler) == before


def test_argument_deltas_after_the_arguments_were_done_are_rejected() -> None:
    events = call_events(0, "fc_1", "call_1", "f", ["{}"])
    assembler = Assembler()
    for event in [CREATED, *events[:3]]:
        assembler.feed(event)
    with pytest.raises(ChunkError, match="arguments were done"):
        assembler.feed(events[1])


def test_a_follower_sees_calls_done_at_their_arguments_done_event() -> None:
    events = [CREATED, *call_events(0, "fc_1", "call_1", "f", ['{"a"', ": 1}"]), *message_events(1, "m", ["ok"]),
              _completed([])]
    assembler = Assembler()
    done_at = None
    for position, event in enumerate(events):
        assembler.feed(event)
        calls = assembler.state.choices[0].calls
        if done_at is None and calls and calls[0].done:
            done_at = position
    assert events[done_at]["type"] == "response.function_call_arguments.done"
    assert assembler.state.choices[0].calls[0].arguments == ['{"a"', ": 1}"]
    assert assembler.state.usage() == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
                                       "prompt_tokens_details": {"cached_tokens": 0},
                                       "completion_tokens_details": {"reasoning_tokens": 0}}
