"""Small hand-built streams, one per fault a peer accumulator is known for and per rule of docs/assembly.md
that the recorded streams do not already exercise."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from openai.types.chat import ChatCompletionChunk

from conftest import RECORDED, load_jsonl
from streamfold.contract import ResultRecord
from streamfold.errors import ChunkError
from worker import Assembler, assemble


def _chunk(*choices: dict[str, Any], **top: Any) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": "chatcmpl-fault",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "fault-model",
        "choices": list(choices),
    }
    chunk.update(top)
    return chunk


def _choice(index: int = 0, finish_reason: str | None = None, **delta: Any) -> dict[str, Any]:
    return {"index": index, "delta": delta, "finish_reason": finish_reason}


def _call(
    arguments: Any, *, index: int | None = None, call_id: str | None = None, name: str | None = None
) -> dict[str, Any]:
    """One tool-call fragment; keys left as None are omitted, as most providers do."""
    fragment: dict[str, Any] = {}
    if index is not None:
        fragment["index"] = index
    if call_id is not None:
        fragment["id"] = call_id
        fragment["type"] = "function"
    function: dict[str, Any] = {"arguments": arguments}
    if name is not None:
        function["name"] = name
    fragment["function"] = function
    return fragment


def _whole_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _message(record: ResultRecord, index: int = 0) -> dict[str, Any]:
    for choice in record["completion"]["choices"]:
        if choice["index"] == index:
            message: dict[str, Any] = choice["message"]
            return message
    raise AssertionError(f"no choice {index} in {record['completion']['choices']!r}")


def _finish(record: ResultRecord, index: int = 0) -> str | None:
    for choice in record["completion"]["choices"]:
        if choice["index"] == index:
            reason: str | None = choice["finish_reason"]
            return reason
    raise AssertionError(f"no choice {index}")


def _sse(chunk: dict[str, Any]) -> str:
    return "data: " + json.dumps(chunk)


# Tool calls


def test_repeated_tool_call_id_is_not_concatenated() -> None:
    record = assemble(
        [
            _chunk(_choice(role="assistant", tool_calls=[_call('{"q": ', index=0, call_id="call_1", name="lookup")])),
            _chunk(_choice(tool_calls=[_call('"tea"}', index=0, call_id="call_1", name="lookup")])),
            _chunk(_choice(finish_reason="tool_calls")),
        ]
    )
    assert record["status"] == "completed"
    assert record["warnings"] == []
    assert _message(record)["tool_calls"] == [_whole_call("call_1", "lookup", '{"q": "tea"}')]


def test_tool_call_fragments_without_index_continue_the_last_call() -> None:
    record = assemble(
        [
            _chunk(_choice(role="assistant", tool_calls=[_call('{"q"', call_id="call_a", name="search")])),
            _chunk(_choice(tool_calls=[_call(': "tea"')])),
            _chunk(_choice(tool_calls=[{"id": "call_a", "function": {"arguments": "}"}}])),
            _chunk(_choice(finish_reason="tool_calls")),
        ]
    )
    assert record["status"] == "completed"
    assert record["warnings"] == []
    assert _message(record)["tool_calls"] == [_whole_call("call_a", "search", '{"q": "tea"}')]


def test_fragment_without_index_after_indexed_calls_continues_the_last_opened_call() -> None:
    record = assemble(
        [
            _chunk(_choice(tool_calls=[_call("{}", index=0, call_id="call_a", name="first")])),
            _chunk(_choice(tool_calls=[_call('{"x"', index=1, call_id="call_b", name="second")])),
            _chunk(_choice(tool_calls=[_call(": 1}")])),
            _chunk(_choice(finish_reason="tool_calls")),
        ]
    )
    assert _message(record)["tool_calls"] == [
        _whole_call("call_a", "first", "{}"),
        _whole_call("call_b", "second", '{"x": 1}'),
    ]


def test_fragment_without_index_with_new_id_opens_new_call() -> None:
    record = assemble(
        [
            _chunk(_choice(tool_calls=[_call('{"a": 1}', call_id="call_a", name="first")])),
            _chunk(_choice(tool_calls=[_call('{"b": ', call_id="call_b", name="second")])),
            _chunk(_choice(tool_calls=[_call("2}")])),
            _chunk(_choice(finish_reason="tool_calls")),
        ]
    )
    assert record["warnings"] == []
    assert _message(record)["tool_calls"] == [
        _whole_call("call_a", "first", '{"a": 1}'),
        _whole_call("call_b", "second", '{"b": 2}'),
    ]


def test_parallel_calls_reusing_index_zero_stay_separate() -> None:
    record = assemble(
        [
            _chunk(_choice(tool_calls=[_call('{"x"', index=0, call_id="call_a", name="first")])),
            _chunk(_choice(tool_calls=[_call(": 1}", index=0)])),
            _chunk(_choice(tool_calls=[_call('{"y"', index=0, call_id="call_b", name="second")])),
            _chunk(_choice(tool_calls=[_call(": 2}", index=0)])),
            _chunk(_choice(finish_reason="tool_calls")),
        ]
    )
    assert record["warnings"] == []
    assert _message(record)["tool_calls"] == [
        _whole_call("call_a", "first", '{"x": 1}'),
        _whole_call("call_b", "second", '{"y": 2}'),
    ]


def test_parallel_calls_reusing_index_zero_in_one_chunk_stay_separate() -> None:
    record = assemble(
        [
            _chunk(
                _choice(
                    tool_calls=[
                        _call('{"city": "Oslo"}', index=0, call_id="call_a", name="weather"),
                        _call('{"city": "Rome"}', index=0, call_id="call_b", name="weather"),
                    ]
                )
            ),
            _chunk(_choice(finish_reason="tool_calls")),
        ]
    )
    assert _message(record)["tool_calls"] == [
        _whole_call("call_a", "weather", '{"city": "Oslo"}'),
        _whole_call("call_b", "weather", '{"city": "Rome"}'),
    ]


def test_tool_calls_are_listed_in_the_order_they_were_opened() -> None:
    record = assemble(
        [
            _chunk(_choice(tool_calls=[_call("{}", index=1, call_id="call_late_index", name="one")])),
            _chunk(_choice(tool_calls=[_call("{}", index=0, call_id="call_early_index", name="zero")])),
            _chunk(_choice(finish_reason="tool_calls")),
        ]
    )
    assert [call["id"] for call in _message(record)["tool_calls"]] == ["call_late_index", "call_early_index"]


def test_tool_calls_are_kept_per_choice() -> None:
    record = assemble(
        [
            _chunk(_choice(0, tool_calls=[_call('{"n": ', index=0, call_id="call_zero", name="f")])),
            _chunk(_choice(1, tool_calls=[_call('{"n": ', index=0, call_id="call_one", name="g")])),
            _chunk(_choice(1, tool_calls=[_call("1}", index=0)])),
            _chunk(_choice(0, tool_calls=[_call("0}", index=0)])),
            _chunk(_choice(0, finish_reason="tool_calls"), _choice(1, finish_reason="tool_calls")),
        ]
    )
    assert record["status"] == "completed"
    assert _message(record, 0)["tool_calls"] == [_whole_call("call_zero", "f", '{"n": 0}')]
    assert _message(record, 1)["tool_calls"] == [_whole_call("call_one", "g", '{"n": 1}')]


def test_tool_call_type_defaults_to_function_and_null_fields_are_ignored() -> None:
    record = assemble(
        [
            _chunk(_choice(tool_calls=[{"index": 0, "id": "call_n", "function": {"name": "f", "arguments": ""}}])),
            _chunk(
                _choice(
                    tool_calls=[{"index": 0, "id": None, "type": None, "function": {"name": None, "arguments": "{}"}}]
                )
            ),
            _chunk(_choice(finish_reason="tool_calls")),
        ]
    )
    assert _message(record)["tool_calls"] == [_whole_call("call_n", "f", "{}")]


def test_invalid_json_arguments_warn_not_crash() -> None:
    record = assemble(
        [
            _chunk(_choice(tool_calls=[_call('{"city": "Par', index=0, call_id="call_cut", name="weather")])),
            _chunk(_choice(finish_reason="tool_calls")),
        ]
    )
    assert record["status"] == "completed"
    assert record["error"] is None
    assert len(record["warnings"]) == 1
    assert _message(record)["tool_calls"] == [_whole_call("call_cut", "weather", '{"city": "Par')]


def test_empty_arguments_are_left_empty_without_a_warning() -> None:
    record = assemble(
        [
            _chunk(_choice(tool_calls=[_call("", index=0, call_id="call_empty", name="ping")])),
            _chunk(_choice(finish_reason="tool_calls")),
        ]
    )
    assert record["status"] == "completed"
    assert record["warnings"] == []
    assert _message(record)["tool_calls"] == [_whole_call("call_empty", "ping", "")]


def test_arguments_as_object_are_serialised() -> None:
    arguments = {"city": "Paris", "days": 3, "units": ["c", "f"]}
    record = assemble(
        [
            _chunk(_choice(tool_calls=[_call(arguments, index=0, call_id="call_obj", name="forecast")])),
            _chunk(_choice(finish_reason="tool_calls")),
        ]
    )
    assert record["warnings"] == []
    (call,) = _message(record)["tool_calls"]
    assert call["id"] == "call_obj"
    assert call["function"]["name"] == "forecast"
    assert isinstance(call["function"]["arguments"], str)
    assert json.loads(call["function"]["arguments"]) == arguments


def test_legacy_function_call_is_assembled_like_a_tool_call_function() -> None:
    record = assemble(
        [
            _chunk(_choice(role="assistant", content=None, function_call={"name": "get_weather", "arguments": ""})),
            _chunk(_choice(function_call={"arguments": '{"city": '})),
            _chunk(_choice(function_call={"arguments": '"Paris"}'})),
            _chunk(_choice(finish_reason="function_call")),
        ]
    )
    assert record["status"] == "completed"
    message = _message(record)
    assert message["function_call"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert message["content"] is None
    assert "tool_calls" not in message


# Choices and finish reasons


def test_choice_one_before_choice_zero() -> None:
    record = assemble(
        [
            _chunk(_choice(1, role="assistant", content="B")),
            _chunk(_choice(1, content="b")),
            _chunk(_choice(1, finish_reason="length"), _choice(0, role="assistant", content="A")),
            _chunk(_choice(0, content="a", finish_reason="stop")),
        ]
    )
    assert record["status"] == "completed"
    assert [choice["index"] for choice in record["completion"]["choices"]] == [0, 1]
    assert _message(record, 0)["content"] == "Aa"
    assert _message(record, 1)["content"] == "Bb"
    assert _finish(record, 0) == "stop"
    assert _finish(record, 1) == "length"


def test_sparse_choice_indexes() -> None:
    record = assemble(
        [
            _chunk(_choice(5, role="assistant", content="five")),
            _chunk(_choice(2, role="assistant", content="two")),
            _chunk(_choice(2, finish_reason="stop"), _choice(5, finish_reason="stop")),
        ]
    )
    assert record["status"] == "completed"
    assert [choice["index"] for choice in record["completion"]["choices"]] == [2, 5]
    assert _message(record, 2)["content"] == "two"
    assert _message(record, 5)["content"] == "five"


def test_missing_finish_reason_is_incomplete_not_stop() -> None:
    record = assemble([_chunk(_choice(role="assistant", content="Hel")), _chunk(_choice(content="lo"))])
    assert record["status"] == "incomplete"
    assert record["error"] is None
    assert _finish(record) is None
    assert _message(record)["content"] == "Hello"


def test_one_unfinished_choice_leaves_the_record_incomplete() -> None:
    record = assemble(
        [
            _chunk(_choice(0, content="done", finish_reason="stop")),
            _chunk(_choice(1, content="cut off")),
        ]
    )
    assert record["status"] == "incomplete"
    assert _finish(record, 0) == "stop"
    assert _finish(record, 1) is None


def test_stream_without_choices_is_incomplete() -> None:
    assert assemble([])["status"] == "incomplete"
    usage_only = assemble([_chunk(usage={"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1})])
    assert usage_only["status"] == "incomplete"
    assert usage_only["completion"]["choices"] == []
    assert usage_only["completion"]["usage"] == {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1}


def test_duplicate_finish_chunks_do_not_concatenate() -> None:
    record = assemble(
        [
            _chunk(_choice(role="assistant", content="ok")),
            _chunk(_choice(finish_reason="stop")),
            _chunk(_choice(finish_reason="stop")),
            _chunk(_choice(content="", finish_reason="stop")),
            _chunk(_choice(finish_reason=None)),
        ]
    )
    assert record["status"] == "completed"
    assert _finish(record) == "stop"
    assert _message(record)["content"] == "ok"


def test_finish_reason_is_the_last_non_null_value() -> None:
    record = assemble(
        [
            _chunk(_choice(content="x", finish_reason="length")),
            _chunk(_choice(finish_reason="stop")),
            _chunk(_choice(finish_reason=None)),
        ]
    )
    assert _finish(record) == "stop"


# Usage


def test_cumulative_usage_is_not_summed() -> None:
    record = assemble(
        [
            _chunk(_choice(content="a"), usage={"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}),
            _chunk(_choice(content="b"), usage={"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}),
            _chunk(
                _choice(content="c", finish_reason="stop"),
                usage={"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
            ),
        ]
    )
    assert record["completion"]["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def test_null_usage_after_a_usage_keeps_the_last_non_null_usage() -> None:
    usage = {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6, "provider_extra": {"cost": 0.5}}
    record = assemble(
        [
            _chunk(_choice(content="hi", finish_reason="stop"), usage=usage),
            _chunk(usage=None),
        ]
    )
    assert record["completion"]["usage"] == usage


def test_total_tokens_is_not_recomputed() -> None:
    sent = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 99}
    record = assemble([_chunk(_choice(content="x", finish_reason="stop")), _chunk(usage=sent)])
    assert record["completion"]["usage"] == sent

    without_total = {"prompt_tokens": 10, "completion_tokens": 5}
    record = assemble([_chunk(_choice(content="x", finish_reason="stop")), _chunk(usage=without_total)])
    assert record["completion"]["usage"] == without_total


# Upstream errors


UPSTREAM_ERROR = {"message": "The server is overloaded", "type": "server_error", "code": "overloaded"}


def test_error_chunk_mid_stream_fails_with_partial_output() -> None:
    record = assemble(
        [
            _chunk(_choice(role="assistant", content="Hel")),
            _chunk(_choice(content="lo")),
            {"error": UPSTREAM_ERROR},
        ]
    )
    assert record["status"] == "failed"
    assert _message(record)["content"] == "Hello"
    assert _finish(record) is None
    error = record["error"]
    assert error is not None
    assert set(error) == {"message", "type", "code", "status"}
    assert error["message"] == "The server is overloaded"
    assert error["type"] == "server_error"
    assert error["code"] == "overloaded"


def test_error_after_every_choice_finished_still_fails() -> None:
    record = assemble([_chunk(_choice(content="done", finish_reason="stop")), {"error": UPSTREAM_ERROR}])
    assert record["status"] == "failed"
    assert record["error"] is not None
    assert record["error"]["message"] == "The server is overloaded"
    assert _message(record)["content"] == "done"


@pytest.mark.parametrize(
    "payload",
    [
        {"error": {"message": "Rate limit reached", "type": "rate_limit_error", "code": "rate_limit_exceeded"}},
        {"message": "Rate limit reached", "type": "rate_limit_error", "code": "rate_limit_exceeded"},
    ],
    ids=["wrapped", "bare"],
)
def test_sse_event_error_fails_request(payload: dict[str, Any]) -> None:
    record = assemble(
        [
            _sse(_chunk(_choice(role="assistant", content="Hi"))),
            "event: error",
            "data: " + json.dumps(payload),
        ]
    )
    assert record["status"] == "failed"
    assert record["error"] is not None
    assert record["error"]["message"] == "Rate limit reached"
    assert _message(record)["content"] == "Hi"


def test_fail_marks_the_record_failed_and_keeps_partial_output() -> None:
    assembler = Assembler()
    assembler.feed(_chunk(_choice(role="assistant", content="partial ")))
    assembler.feed(_chunk(_choice(content="answer")))
    error = {"message": "upstream closed the connection", "type": "upstream_error", "code": None, "status": 502}
    assembler.fail(error)
    record = assembler.result(request_id="req-failed")
    assert record["status"] == "failed"
    assert record["request_id"] == "req-failed"
    assert record["error"] == error
    assert _message(record)["content"] == "partial answer"
    assert record["metrics"]["chunks"] == 2


# Input forms


def test_sse_lines_done_and_comments() -> None:
    record = assemble(
        [
            ": keep-alive",
            "",
            "id: 7",
            "retry: 3000",
            _sse(_chunk(_choice(role="assistant", content="Hel"))),
            b": another comment",
            (_sse(_chunk(_choice(content="lo")))).encode("utf-8"),
            "",
            _sse(_chunk(_choice(finish_reason="stop"), usage=None)),
            _sse(_chunk(usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})),
            "data: [DONE]",
        ]
    )
    assert record["status"] == "completed"
    assert record["warnings"] == []
    assert record["metrics"]["chunks"] == 4
    assert _message(record)["content"] == "Hello"
    assert record["completion"]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


OPENAI_STREAMS = [
    "openai_parallel_tool_calls.jsonl",
    "openai_content_logprobs.jsonl",
    "openai_n3_multiple_choices.jsonl",
    "openai_refusal_logprobs.jsonl",
]


def _outcome(record: ResultRecord) -> tuple[Any, ...]:
    return (record["status"], record["completion"], record["warnings"], record["error"], record["metrics"]["chunks"])


@pytest.mark.parametrize("name", OPENAI_STREAMS)
def test_bytes_str_dict_and_model_dump_inputs_agree(name: str) -> None:
    raw = load_jsonl(RECORDED / name)
    as_str = [line.decode("utf-8") for line in raw]
    as_dict = [json.loads(line) for line in raw]
    as_model = [ChatCompletionChunk.model_validate(chunk) for chunk in as_dict]
    forms: list[list[Any]] = [raw, as_str, as_dict, as_model]
    mixed = [forms[position % 4][position] for position in range(len(raw))]

    expected = _outcome(assemble(raw))
    assert expected[0] == "completed"
    for chunks in [as_str, as_dict, as_model, mixed]:
        assert _outcome(assemble(chunks)) == expected


@pytest.mark.parametrize(
    "name",
    [
        "azure_prompt_filter_first_chunk.jsonl",
        "groq_tool_call_whole_args.jsonl",
        "openai_content_logprobs.jsonl",
        "openai_parallel_tool_calls.jsonl",
        "perplexity_cumulative_usage_every_chunk.jsonl",
        "mistral_magistral_content_parts_reasoning.jsonl",
    ],
)
def test_input_chunks_are_not_mutated(name: str) -> None:
    chunks = [json.loads(line) for line in load_jsonl(RECORDED / name)]
    before = copy.deepcopy(chunks)
    assembler = Assembler()
    for chunk in chunks:
        assembler.feed(chunk)
    assembler.result()
    assemble(chunks)
    assert chunks == before


def test_hand_built_chunks_with_merged_fields_are_not_mutated() -> None:
    chunks = [
        _chunk({**_choice(content="a"), "filter": {"x": 1}}, x_meta={"a": 1}, usage={"prompt_tokens": 1}),
        _chunk(
            {**_choice(tool_calls=[_call({"k": "v"}, index=0, call_id="call_m", name="m")]), "filter": {"y": 2}},
            x_meta={"b": 2},
        ),
        _chunk(_choice(tool_calls=[_call("", index=0)], finish_reason="tool_calls"), x_meta={"a": 3}),
    ]
    before = copy.deepcopy(chunks)
    assemble(chunks)
    assert chunks == before


# Malformed input


GOOD_FIRST = _chunk(_choice(role="assistant", content="Hi"))
GOOD_NEXT = _chunk(_choice(content=" there"))
GOOD_LAST = _chunk(_choice(finish_reason="stop"), usage={"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4})

MALFORMED: dict[str, Any] = {
    "not_json": b"this is not json",
    "truncated_json": '{"choices": [',
    "json_array": "[1, 2, 3]",
    "json_number": "42",
    "json_null": "null",
    "not_a_chunk_type": 12345,
    "choices_not_a_list": {"choices": {"index": 0, "delta": {"content": "X"}}},
    "choice_index_not_an_integer": {"choices": [{"index": "0", "delta": {"content": "X"}}]},
    "delta_not_an_object": {"choices": [{"index": 0, "delta": "X"}]},
    "content_a_number": {"choices": [{"index": 0, "delta": {"content": 5}}]},
    "content_an_object": {"choices": [{"index": 0, "delta": {"content": {"text": "X"}}}]},
    "tool_calls_not_a_list": {
        "choices": [{"index": 0, "delta": {"content": "X", "tool_calls": {"index": 0, "id": "call_x"}}}]
    },
    "second_choice_bad": {
        "choices": [{"index": 0, "delta": {"content": "X"}, "finish_reason": "length"}, {"index": 1, "delta": []}],
        "usage": {"prompt_tokens": 99, "completion_tokens": 99, "total_tokens": 198},
    },
    "bad_choices_with_usage": {
        "choices": "X",
        "usage": {"prompt_tokens": 99, "completion_tokens": 99, "total_tokens": 198},
    },
}


@pytest.mark.parametrize("bad", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_chunk_raises_naming_its_position_and_changes_nothing(bad: Any) -> None:
    assembler = Assembler()
    assembler.feed(GOOD_FIRST)
    with pytest.raises(ChunkError) as raised:
        assembler.feed(bad)
    assert str(raised.value).startswith("chunk 1:")
    assert raised.value.position == 1
    assembler.feed(GOOD_NEXT)
    assembler.feed(GOOD_LAST)
    record = assembler.result()
    assert record["status"] == "completed"
    assert record["metrics"]["chunks"] == 3
    assert [choice["index"] for choice in record["completion"]["choices"]] == [0]
    assert _message(record) == {"role": "assistant", "content": "Hi there", "refusal": None}
    assert _finish(record) == "stop"
    assert record["completion"]["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}


def test_chunk_positions_count_every_item_fed() -> None:
    assembler = Assembler()
    assembler.feed(": comment")
    assembler.feed(GOOD_FIRST)
    with pytest.raises(ChunkError) as first:
        assembler.feed("not json")
    assert first.value.position == 2
    assembler.feed(GOOD_NEXT)
    with pytest.raises(ChunkError) as second:
        assembler.feed({"choices": [{"index": 0, "delta": {"content": 7}}]})
    assert str(second.value).startswith("chunk 4:")
    assert second.value.position == 4
    assembler.feed(GOOD_LAST)
    assert _message(assembler.result())["content"] == "Hi there"


def test_assemble_raises_chunk_error_naming_the_bad_position() -> None:
    with pytest.raises(ChunkError) as raised:
        assemble([GOOD_FIRST, GOOD_NEXT, b"{broken", GOOD_LAST])
    assert str(raised.value).startswith("chunk 2:")
    assert raised.value.position == 2


# Output modes


@pytest.mark.parametrize(
    "pieces",
    [
        ["ha", "ha", "ha"],
        ["a", "aa", "aaa"],
        ["a", "aa", "aa"],
        ["=", "==", "==", "=="],
        ["", "ha", "", "ha", "ha", ""],
        ["-", "--", "---", "--"],
        ["no", "no", "no", "nono"],
        ["ab", "abc", "ab"],
        ["Hello", " world", "!", "!"],
        ["\n", "\n", "\n\n", "\n"],
    ],
)
@pytest.mark.parametrize("field", ["content", "refusal", "reasoning_content", "reasoning"])
def test_auto_mode_never_misreads_incremental_stream(pieces: list[str], field: str) -> None:
    chunks = [_chunk(_choice(role="assistant"))]
    chunks += [_chunk({"index": 0, "delta": {field: piece}}) for piece in pieces]
    chunks.append(_chunk(_choice(finish_reason="stop")))
    record = assemble(chunks)
    assert record["status"] == "completed"
    assert _message(record)[field] == "".join(pieces)


def test_auto_mode_reads_an_unmistakably_cumulative_stream_as_cumulative() -> None:
    record = assemble(
        [
            _chunk(_choice(role="assistant", content="")),
            _chunk(_choice(content="Bon")),
            _chunk(_choice(content="Bonjour")),
            _chunk(_choice(content="Bonjour !")),
            _chunk(_choice(content="Bonjour !", finish_reason="stop")),
        ]
    )
    assert _message(record)["content"] == "Bonjour !"


def test_short_cumulative_stream_needs_cumulative_mode() -> None:
    chunks = [
        _chunk(_choice(content="Hi")),
        _chunk(_choice(content="Hi there")),
        _chunk(_choice(content="Hi there", finish_reason="stop")),
    ]
    assert _message(assemble(chunks))["content"] == "HiHi thereHi there"
    cumulative = assemble(chunks, mode="cumulative")
    assert _message(cumulative)["content"] == "Hi there"
    assert cumulative["warnings"] == []


def test_auto_mode_decides_per_field() -> None:
    record = assemble(
        [
            _chunk(_choice(reasoning_content="think")),
            _chunk(_choice(reasoning_content="ing")),
            _chunk(_choice(content="I")),
            _chunk(_choice(content="I am")),
            _chunk(_choice(content="I am here")),
            _chunk(_choice(content="I am here", finish_reason="stop")),
        ]
    )
    message = _message(record)
    assert message["content"] == "I am here"
    assert message["reasoning_content"] == "thinking"


def test_cumulative_mode_warns_when_a_chunk_does_not_extend_the_text() -> None:
    record = assemble(
        [
            _chunk(_choice(content="Hello")),
            _chunk(_choice(content="Hello wor")),
            _chunk(_choice(content="Help", finish_reason="stop")),
        ],
        mode="cumulative",
    )
    assert _message(record)["content"] == "Help"
    assert len(record["warnings"]) >= 1
    assert record["status"] == "completed"


def test_cumulative_mode_applies_to_refusal_and_reasoning_but_not_to_arguments() -> None:
    record = assemble(
        [
            _chunk(_choice(reasoning_content="Hm", reasoning="So")),
            _chunk(_choice(reasoning_content="Hmm.", reasoning="So,")),
            _chunk(_choice(refusal="I can")),
            _chunk(_choice(refusal="I cannot.")),
            _chunk(_choice(tool_calls=[_call('{"a"', index=0, call_id="call_c", name="f")])),
            _chunk(_choice(tool_calls=[_call(": 1}", index=0)])),
            _chunk(_choice(finish_reason="tool_calls")),
        ],
        mode="cumulative",
    )
    message = _message(record)
    assert message["reasoning_content"] == "Hmm."
    assert message["reasoning"] == "So,"
    assert message["refusal"] == "I cannot."
    assert message["content"] is None
    assert message["tool_calls"] == [_whole_call("call_c", "f", '{"a": 1}')]
    assert record["warnings"] == []


# The message


def test_role_is_set_once() -> None:
    record = assemble(
        [
            _chunk(_choice(role="", content="a")),
            _chunk(_choice(role="assistant", content="b")),
            _chunk(_choice(role="assistant", content="c")),
            _chunk(_choice(role="assistant", finish_reason="stop")),
        ]
    )
    assert _message(record)["role"] == "assistant"
    assert _message(record)["content"] == "abc"


def test_role_defaults_to_assistant() -> None:
    record = assemble([_chunk(_choice(content="x", finish_reason="stop"))])
    assert _message(record) == {"role": "assistant", "content": "x", "refusal": None}


def test_refusal_is_kept_apart_from_content() -> None:
    record = assemble(
        [
            _chunk(_choice(role="assistant", content="Sure, ", refusal="")),
            _chunk(_choice(refusal="but not ")),
            _chunk(_choice(content="here.", refusal="that.")),
            _chunk(_choice(finish_reason="stop")),
        ]
    )
    message = _message(record)
    assert message["content"] == "Sure, here."
    assert message["refusal"] == "but not that."


def test_reasoning_content_and_reasoning_are_kept_apart() -> None:
    record = assemble(
        [
            _chunk(_choice(reasoning_content="first ")),
            _chunk(_choice(reasoning="second ")),
            _chunk(_choice(reasoning_content="thought", reasoning="thought")),
            _chunk(_choice(content="answer", finish_reason="stop")),
        ]
    )
    assert _message(record) == {
        "role": "assistant",
        "content": "answer",
        "refusal": None,
        "reasoning_content": "first thought",
        "reasoning": "second thought",
    }


def test_content_parts_list_goes_to_content_and_reasoning_content() -> None:
    record = assemble(
        [
            _chunk(
                _choice(
                    content=[
                        {"type": "thinking", "thinking": [{"type": "text", "text": "Adding "}]},
                        {"type": "thinking", "thinking": [{"type": "text", "text": "two numbers."}]},
                    ]
                )
            ),
            _chunk(_choice(content=[{"type": "text", "text": "1 + 1"}, {"type": "text", "text": " = 2"}])),
            _chunk(_choice(content=".", finish_reason="stop")),
        ]
    )
    message = _message(record)
    assert message["content"] == "1 + 1 = 2."
    assert message["reasoning_content"] == "Adding two numbers."


def test_unknown_delta_fields_are_kept() -> None:
    annotations = [{"type": "url_citation", "url_citation": {"url": "https://example.org", "title": "Example"}}]
    record = assemble(
        [
            _chunk(_choice(content="See example.org")),
            _chunk(_choice(annotations=annotations, finish_reason="stop")),
        ]
    )
    assert _message(record)["annotations"] == annotations


# The completion's envelope


def test_id_model_and_created_come_from_the_first_non_empty_values() -> None:
    record = assemble(
        [
            _chunk(id="", model="", created=0, object=""),
            _chunk(_choice(content="x"), id="chatcmpl-first", model="model-first", created=111),
            _chunk(_choice(finish_reason="stop"), id="chatcmpl-second", model="model-second", created=222),
        ]
    )
    completion = record["completion"]
    assert completion["id"] == "chatcmpl-first"
    assert completion["model"] == "model-first"
    assert completion["created"] == 111
    assert completion["object"] == "chat.completion"


def test_service_tier_and_system_fingerprint_appear_only_when_some_chunk_had_one() -> None:
    without = assemble(
        [_chunk(_choice(content="x", finish_reason="stop"), service_tier=None, system_fingerprint=None)]
    )
    assert "service_tier" not in without["completion"]
    assert "system_fingerprint" not in without["completion"]

    with_values = assemble(
        [
            _chunk(_choice(content="x"), service_tier=None, system_fingerprint=None),
            _chunk(_choice(finish_reason="stop"), service_tier="default", system_fingerprint="fp_1"),
        ]
    )
    assert with_values["completion"]["service_tier"] == "default"
    assert with_values["completion"]["system_fingerprint"] == "fp_1"


def test_unknown_fields_merge_objects_key_by_key_and_keep_the_last_other_value() -> None:
    record = assemble(
        [
            _chunk(
                {**_choice(content="a"), "filter": {"hate": "low", "violence": "low"}, "tag": "one"},
                x_meta={"a": 1, "b": 1},
                note="first",
                sources=["s1"],
            ),
            _chunk({**_choice(content="b"), "filter": {"violence": "high"}, "tag": None}, x_meta={"b": 2}, note=None),
            _chunk(
                {**_choice(finish_reason="stop"), "filter": {}, "tag": "two"},
                x_meta={"c": 3},
                note="last",
                sources=None,
            ),
        ]
    )
    completion = record["completion"]
    assert completion["x_meta"] == {"a": 1, "b": 2, "c": 3}
    assert completion["note"] == "last"
    assert completion["sources"] == ["s1"]
    choice = completion["choices"][0]
    assert choice["filter"] == {"hate": "low", "violence": "high"}
    assert choice["tag"] == "two"


def test_request_id_and_meta_are_carried_into_the_record() -> None:
    chunks = [_chunk(_choice(content="x", finish_reason="stop"))]
    record = assemble(chunks, request_id="req-42", meta={"tenant": "acme", "attempt": 2})
    assert record["request_id"] == "req-42"
    assert record["meta"] == {"tenant": "acme", "attempt": 2}
    assert set(record) == {"request_id", "status", "format", "completion", "native", "error", "warnings", "metrics",
                           "meta"}


def test_choice_without_index_is_choice_zero() -> None:
    result = assemble([
        {"choices": [{"index": 0, "delta": {"content": "Hi"}}]},
        {"choices": [{"delta": {"content": " there"}, "finish_reason": "stop"}]},
    ])

    assert [choice["index"] for choice in result["completion"]["choices"]] == [0]
    assert result["completion"]["choices"][0]["message"]["content"] == "Hi there"
    assert result["status"] == "completed"


def test_a_bad_line_after_an_error_event_does_not_turn_the_next_chunk_into_an_error() -> None:
    assembler = Assembler()
    assembler.feed("event: error")
    with pytest.raises(ChunkError):
        assembler.feed("data: not json")
    assembler.feed('data: {"choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}]}')

    result = assembler.result()
    assert result["status"] == "completed"
    assert result["error"] is None
    assert result["completion"]["choices"][0]["message"]["content"] == "ok"


def test_a_comment_between_error_event_and_its_data_keeps_the_event() -> None:
    result = assemble(["event: error", ": keep-alive", 'data: {"error": {"message": "overloaded"}}'])

    assert result["status"] == "failed"
    assert result["error"] is not None and result["error"]["message"] == "overloaded"
