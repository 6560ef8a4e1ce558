"""Gemini streams: every recorded stream against expectations checked by hand against its raw chunks (no SDK
accumulates Gemini streams), and the dialect's rules (docs/assembly.md) one by one on small streams."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from native_streams import clean_record, fixture_names, follow, gemini_chunk, native_events, partial, snapshot
from streamfold.errors import ChunkError
from worker import Assembler, assemble

FIXTURES = {"gemini_code_execution.jsonl", "gemini_function_call_json_array.jsonl",
            "gemini_parallel_function_calls.jsonl", "gemini_text_usage_every_chunk.jsonl",
            "gemini_thinking_final_empty_part_signature.jsonl", "gemini_vertex_thinking_usage_last_only.jsonl"}


def _texts(name: str, thought: bool) -> str:
    parts = [part for chunk in native_events("gemini", name) for candidate in chunk["candidates"]
             for part in candidate["content"]["parts"]]
    return "".join(part["text"] for part in parts if "text" in part and part.get("thought", False) == thought)


def _call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def test_every_recorded_gemini_stream_has_a_test_here() -> None:
    assert set(fixture_names("gemini")) == FIXTURES


def test_usage_on_every_chunk_is_the_last_even_when_counts_shrink() -> None:
    record = clean_record("gemini", "gemini_text_usage_every_chunk.jsonl")
    assert record["completion"] == {
        "id": "w1peaMz6INOvnvgPgYfPiQY", "object": "chat.completion", "created": 0, "model": "gemini-2.0-flash-exp",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "The capital of France is Paris.\n",
                                             "refusal": None}, "finish_reason": "stop", "logprobs": None}],
        # promptTokenCount 15, 15, then 13: the last, never a sum nor a maximum
        "usage": {"prompt_tokens": 13, "completion_tokens": 8, "total_tokens": 21},
    }
    last = native_events("gemini", "gemini_text_usage_every_chunk.jsonl")[-1]
    assert record["native"] == {
        "candidates": [{"content": {"parts": [{"text": "The capital of France is Paris.\n"}], "role": "model"},
                        "finishReason": "STOP"}],
        "usageMetadata": last["usageMetadata"], "modelVersion": "gemini-2.0-flash-exp",
        "responseId": "w1peaMz6INOvnvgPgYfPiQY"}


def test_thoughts_are_reasoning_and_the_final_empty_part_gives_its_signature_to_the_answer() -> None:
    name = "gemini_thinking_final_empty_part_signature.jsonl"
    record = clean_record("gemini", name)
    message = record["completion"]["choices"][0]["message"]
    thoughts, answer = _texts(name, True), _texts(name, False)
    assert thoughts.startswith("**Defining the Narrative Parameters**") and answer.startswith("Here is a cozy")
    assert message == {"role": "assistant", "content": answer, "refusal": None, "reasoning_content": thoughts}
    signature = native_events("gemini", name)[-1]["candidates"][0]["content"]["parts"][0]["thoughtSignature"]
    assert record["native"]["candidates"][0]["content"]["parts"] == [
        {"text": thoughts, "thought": True}, {"text": answer, "thoughtSignature": signature}]
    assert record["completion"]["usage"] == {"prompt_tokens": 11, "completion_tokens": 1416, "total_tokens": 1427,
                                             "completion_tokens_details": {"reasoning_tokens": 713}}


def test_vertex_usage_only_at_the_end_and_created_from_create_time() -> None:
    name = "gemini_vertex_thinking_usage_last_only.jsonl"
    events = native_events("gemini", name)
    assert assemble(events[:-1])["completion"]["usage"] is None  # {"trafficType": "ON_DEMAND"} has no counts
    record = clean_record("gemini", name)
    assert record["completion"]["created"] == 1753718567  # 2025-07-28T16:02:47Z
    assert record["completion"]["usage"] == {"prompt_tokens": 9, "completion_tokens": 1201, "total_tokens": 1210,
                                             "completion_tokens_details": {"reasoning_tokens": 1067}}
    assert record["native"]["createTime"] == "2025-07-28T16:02:47.774462Z"
    assert list(record["native"]["candidates"][0]["content"]) == ["role", "parts"]  # Vertex's key order kept


def test_a_function_call_without_id_gets_a_stable_one_and_finishes_with_tool_calls() -> None:
    name = "gemini_function_call_json_array.jsonl"
    record = clean_record("gemini", name)
    choice = record["completion"]["choices"][0]
    assert choice["message"]["tool_calls"] == [_call("call_OYpyaqycKd2V_uMP65TsgA0_0", "pelican_name_generator", "{}")]
    assert choice["message"]["content"] is None and choice["message"]["reasoning_content"] == _texts(name, True)
    assert choice["finish_reason"] == "tool_calls"  # STOP with calls
    candidate = record["native"]["candidates"][0]
    assert candidate["content"]["parts"][1] == native_events("gemini", name)[1]["candidates"][0]["content"]["parts"][0]
    assert candidate["finishMessage"] == "Model generated function call(s)."


def test_parallel_function_calls_keep_their_ids() -> None:
    record = clean_record("gemini", "gemini_parallel_function_calls.jsonl")
    message = record["completion"]["choices"][0]["message"]
    assert message["tool_calls"] == [_call("dv8szvqe", "get_weather", '{"location":"Boston"}'),
                                     _call("j80tal12", "get_weather", '{"location":"New Delhi"}')]
    assert record["completion"]["choices"][0]["finish_reason"] == "tool_calls"
    assert record["completion"]["usage"]["completion_tokens"] == 33 + 93


def test_code_execution_stays_in_native_and_tool_use_prompt_tokens_count_as_prompt() -> None:
    name = "gemini_code_execution.jsonl"
    record = clean_record("gemini", name)
    assert record["completion"]["choices"][0]["message"]["content"] == _texts(name, False)
    parts = record["native"]["candidates"][0]["content"]["parts"]
    assert [next(iter(part)) for part in parts] == ["text", "executableCode", "codeExecutionResult", "text"]
    assert record["completion"]["usage"] == {"prompt_tokens": 32 + 764, "completion_tokens": 477 + 240,
                                             "total_tokens": 1513,
                                             "completion_tokens_details": {"reasoning_tokens": 240}}


# --- the rules, on small streams ----------------------------------------------------------------------------

@pytest.mark.parametrize(("reason", "finish_reason"), [
    ("STOP", "stop"), ("MAX_TOKENS", "length"), ("SAFETY", "content_filter"), ("RECITATION", "content_filter"),
    ("BLOCKLIST", "content_filter"), ("PROHIBITED_CONTENT", "content_filter"), ("SPII", "content_filter"),
    ("OTHER", "content_filter"), ("MALFORMED_FUNCTION_CALL", "MALFORMED_FUNCTION_CALL")])
def test_finish_reasons_are_mapped(reason: str, finish_reason: str) -> None:
    record = assemble([gemini_chunk({"text": "a"}), gemini_chunk({"text": "b"}, finish=reason)])
    assert record["completion"]["choices"][0]["finish_reason"] == finish_reason
    assert record["status"] == "completed"


def test_a_stream_cut_before_its_finish_reason_is_incomplete() -> None:
    assert assemble([gemini_chunk({"text": "a"})])["status"] == "incomplete"


def test_a_blocked_prompt_finishes_choice_zero_with_content_filter() -> None:
    chunk = {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 7,
                                                                            "totalTokenCount": 7}}
    record = assemble([chunk])
    assert record["format"] == "gemini" and record["status"] == "completed"
    assert record["completion"]["choices"][0]["finish_reason"] == "content_filter"
    assert record["native"]["promptFeedback"] == {"blockReason": "SAFETY"}


def test_several_candidates_each_get_their_own_choice() -> None:
    chunks = [{"candidates": [{"content": {"parts": [{"text": "A"}]}, "index": 0},
                              {"content": {"parts": [{"text": "B"}]}, "index": 1}]},
              gemini_chunk({"text": "b"}, index=1, finish="STOP"), gemini_chunk({"text": "a"}, finish="STOP")]
    choices = assemble(chunks)["completion"]["choices"]
    assert [(choice["message"]["content"], choice["finish_reason"]) for choice in choices] == [("Aa", "stop"),
                                                                                              ("Bb", "stop")]


def test_an_error_chunk_fails_the_stream_and_keeps_the_output() -> None:
    error = {"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}
    record = assemble([gemini_chunk({"text": "so far"}), error])
    assert record["status"] == "failed"
    assert record["error"] == {"message": "The model is overloaded.", "type": "upstream_error", "code": "UNAVAILABLE",
                               "status": 503}
    assert record["completion"]["choices"][0]["message"]["content"] == "so far"


# --- Vertex's streamed function-call arguments ---------------------------------------------------------------

def _vertex_stream() -> list[dict[str, Any]]:
    """Two calls, the first streamed: a name and args first, partialArgs after, an empty functionCall closing it."""
    return [gemini_chunk({"functionCall": {"name": "controlLight", "args": {"room": "living"}, "willContinue": True}}),
            gemini_chunk({"functionCall": {"partialArgs": [partial("$.brightness", numberValue=50),
                                                           partial("$.color", stringValue="warm", willContinue=True)],
                                           "willContinue": True}}),
            gemini_chunk({"functionCall": {"partialArgs": [partial("$.color", stringValue=" white")],
                                           "willContinue": True}}),
            gemini_chunk({"functionCall": {}},
                         {"functionCall": {"name": "setThermostat",
                                           "partialArgs": [partial("$.temp", numberValue=21)]}},
                         finish="STOP")]


def test_streamed_arguments_become_ordinary_calls_once_each_closes() -> None:
    record = assemble(_vertex_stream())
    message = record["completion"]["choices"][0]["message"]
    assert message["tool_calls"] == [
        _call("call_resp-test_0", "controlLight", '{"room":"living","brightness":50,"color":"warm white"}'),
        _call("call_resp-test_1", "setThermostat", '{"temp":21}')]
    assert record["native"]["candidates"][0]["content"]["parts"] == [
        {"functionCall": {"name": "controlLight", "args": {"room": "living", "brightness": 50, "color": "warm white"}}},
        {"functionCall": {"name": "setThermostat", "args": {"temp": 21}}}]
    assert record["completion"]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_follower_sees_a_streamed_call_at_once_and_its_arguments_whole_when_it_closes() -> None:
    assembler = Assembler()
    seen = []
    for chunk in _vertex_stream():
        assembler.feed(chunk)
        calls = assembler.state.choices[0].calls
        seen.append([(call.name, list(call.arguments), call.done) for call in calls])
    assert seen[:3] == [[("controlLight", [], False)]] * 3
    assert seen[3] == [("controlLight", ['{"room":"living","brightness":50,"color":"warm white"}'], True),
                       ("setThermostat", ['{"temp":21}'], True)]


def test_json_paths_set_nested_values_and_a_string_goes_on_only_after_will_continue() -> None:
    fragments = [partial("$.a.b", numberValue=1), partial("$['c d'][1]", boolValue=True),
                 partial('$["e"][0].f', nullValue="NULL_VALUE"), partial("$.s", stringValue="hel", willContinue=True)]
    chunks = [gemini_chunk({"functionCall": {"name": "f", "partialArgs": fragments, "willContinue": True}}),
              gemini_chunk({"functionCall": {"partialArgs": [partial("$.s", stringValue="lo"),
                                                             partial("$.t", stringValue="x")], "willContinue": True}}),
              gemini_chunk({"functionCall": {"partialArgs": [partial("$.t", stringValue="y")]}}, finish="STOP")]
    arguments = assemble(chunks)["completion"]["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    assert json.loads(arguments) == {"a": {"b": 1}, "c d": [None, True], "e": [{"f": None}], "s": "hello", "t": "y"}


def test_a_new_call_closes_a_streamed_one_left_open() -> None:
    chunks = [gemini_chunk({"functionCall": {"name": "f", "partialArgs": [partial("$.x", numberValue=1)],
                                             "willContinue": True}}),
              gemini_chunk({"functionCall": {"name": "g", "args": {"y": 2}, "id": "g1"}}, finish="STOP")]
    calls = assemble(chunks)["completion"]["choices"][0]["message"]["tool_calls"]
    assert [(call["function"]["name"], call["function"]["arguments"]) for call in calls] == [("f", '{"x":1}'),
                                                                                            ("g", '{"y":2}')]


def test_a_stream_cut_inside_a_streamed_call_keeps_the_call_open_and_its_arguments_in_native() -> None:
    record = assemble(_vertex_stream()[:2])
    assert record["status"] == "incomplete"
    assert record["completion"]["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == ""
    assert record["native"]["candidates"][0]["content"]["parts"][0]["functionCall"]["args"] == {
        "room": "living", "brightness": 50, "color": "warm"}


@pytest.mark.parametrize(("chunk", "reason"), [
    ({"candidates": {"0": {}}}, "candidates must be a list"),
    (gemini_chunk("text"), r"parts\[0\] must be an object"),
    (gemini_chunk({"text": 5}), r"parts\[0\].text must be a string"),
    (gemini_chunk({"functionCall": {"name": "f", "args": [1]}}), "functionCall.args must be an object"),
    (gemini_chunk({"functionCall": {"name": "f", "partialArgs": [partial("$..x", numberValue=1)]}}),
     "unsupported jsonPath"),
    (gemini_chunk({"functionCall": {"name": "f", "partialArgs": [partial("$.x", stringValue=1)]}}),
     "stringValue must be a string"),
    ({"modelVersion": "m"}, "not a Gemini chunk"),
])
def test_a_rejected_chunk_names_what_is_wrong_and_changes_nothing(chunk: dict[str, Any], reason: str) -> None:
    assembler = Assembler(format="gemini")
    for item in _vertex_stream()[:2]:
        assembler.feed(item)
    before = snapshot(assembler)
    with pytest.raises(ChunkError, match=reason):
        assembler.feed(chunk)
    assert snapshot(assembler) == before


@st.composite
def vertex_streams(draw: st.DrawFn) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A streamed call: string values cut into fragments that go on, numbers and booleans set whole; closed
    by an empty functionCall or by a last part that does not go on. Returns the chunks and the arguments."""
    expected: dict[str, Any] = {}
    fragments: list[dict[str, Any]] = []
    for number in range(draw(st.integers(0, 4))):
        key = f"k{number}"
        value = draw(st.one_of(st.text(max_size=12), st.integers(-10**6, 10**6), st.booleans()))
        expected[key] = value
        if isinstance(value, str):
            cuts = sorted(draw(st.lists(st.integers(0, len(value)), max_size=4)))
            pieces = [value[start:end] for start, end in zip([0, *cuts], [*cuts, len(value)])]
            fragments += [partial(f"$.{key}", stringValue=piece, willContinue=True) for piece in pieces[:-1]]
            fragments.append(partial(f"$.{key}", stringValue=pieces[-1]))
        else:
            fragments.append(partial(f"$.{key}", **{"boolValue" if isinstance(value, bool) else "numberValue": value}))
    chunks = [gemini_chunk({"functionCall": {"name": "f", "willContinue": True}})]
    for fragment in fragments:
        chunks.append(gemini_chunk({"functionCall": {"partialArgs": [fragment], "willContinue": True}}))
    chunks.append(gemini_chunk({"functionCall": {}}, finish="STOP"))
    return chunks, expected


@settings(max_examples=60, deadline=None)
@given(case=vertex_streams())
def test_any_streamed_call_becomes_the_call_its_fragments_spell(case: tuple[list[dict[str, Any]], Any]) -> None:
    chunks, expected = case
    assembler = follow(chunks)
    call = assembler.state.choices[0].calls[0]
    assert call.done and json.loads("".join(call.arguments)) == expected
    assert assembler.result()["status"] == "completed"
