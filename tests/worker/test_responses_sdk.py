"""Streamfold against the official OpenAI SDK's Responses stream state, on every recorded stream and on
generated ones.

The oracle is the openai SDK's ``ResponseStreamState``, fed the same events as its client builds them. Both
must agree on the text, the function calls (call id, name, arguments), the status and the usage; mid-stream
(a cut stream) on the output items so far. Where Streamfold differs on purpose, the test says so:

- reasoning: the SDK's state does not follow summary or reasoning-text deltas (a reasoning item is what its
  ``output_item.done`` says); Streamfold also streams them into reasoning_content, so they are compared with
  the done items instead;
- an ``error`` event: the SDK's state ignores it (its stream raises instead); Streamfold fails the record;
- a stream whose items arrive out of ``output_index`` order (the API sends them in order): the SDK's
  snapshot lists them as they came, Streamfold's by ``output_index``, as the final response does;
- a ``*.done`` event whose text disagrees with the deltas: the SDK keeps the deltas in its snapshot and the
  final response's text in its result, as Streamfold does for ``native``, while the completion keeps the
  streamed text (only ever appended to) with a warning.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from native_streams import (call_events, call_item, fixture_names, follow, message_events, message_item,
                            native_events, response_event, responses_usage)
from worker import assemble

openai_models = pytest.importorskip("openai._models")
responses_stream = pytest.importorskip("openai.lib.streaming.responses._responses")
from openai._types import omit  # noqa: E402 - only once the SDK is known to be there
from openai.types.responses import ResponseStreamEvent  # noqa: E402


def sdk_response(events: list[dict[str, Any]]) -> tuple[Any, bool]:
    """The SDK's response: the final one (its result, or the event's for incomplete and failed) or its
    snapshot of a stream that never finished; and whether it is final."""
    state = responses_stream.ResponseStreamState(input_tools=omit, text_format=omit)
    handled: list[Any] = []
    for event in events:
        if event["type"] != "error":
            handled = state.handle_event(openai_models.construct_type(type_=ResponseStreamEvent, value=event))
    if state._completed_response is not None:
        return state._completed_response, True
    finals = [event.response for event in handled if event.type in ("response.incomplete", "response.failed")]
    if finals:
        return finals[0], True
    return getattr(state, "_ResponseStreamState__current_snapshot"), False


def _texts(output: list[dict[str, Any]]) -> str | None:
    texts = [part["text"] for item in output if item["type"] == "message"
             for part in item.get("content") or () if part["type"] == "output_text"]
    return "".join(texts) if texts else None


def _calls(output: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(item["call_id"], item["name"], item["arguments"]) for item in output if item["type"] == "function_call"]


def assert_agree(events: list[dict[str, Any]]) -> None:
    record = assemble(events)
    final, finished = sdk_response(events)
    sdk_output = [item.to_dict() for item in final.output]
    native = record["native"]
    ours = [item for item in native["output"]]
    assert [(item["type"], item.get("id")) for item in ours] == [(item["type"], item.get("id")) for item in sdk_output]
    assert _texts(ours) == _texts(sdk_output)
    assert _calls(ours) == _calls(sdk_output)

    message = record["completion"]["choices"][0]["message"]
    if not record["warnings"]:
        assert message["content"] == _texts(sdk_output)
    calls = [(call["id"], call["function"]["name"], call["function"]["arguments"])
             for call in message.get("tool_calls", [])]
    assert calls == _calls(sdk_output)
    summaries = [part["text"] for item in sdk_output if item["type"] == "reasoning"
                 for part in item.get("summary") or ()]
    if finished and summaries:
        assert message["reasoning_content"] == "\n\n".join(summary for summary in summaries if summary)
    if finished:
        assert native["status"] == final.status
        sdk_usage = final.usage.to_dict() if final.usage is not None else None
        assert native.get("usage") == sdk_usage


@pytest.mark.parametrize("name", fixture_names("responses"))
def test_every_recorded_stream_agrees_with_the_sdk(name: str) -> None:
    assert_agree(native_events("responses", name))


# --- generated streams ------------------------------------------------------------------------------------

pieces = st.lists(st.text(max_size=20), max_size=6)
json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=10),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                        max_size=3), max_leaves=8)


def _cut(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(min(cut, len(text)) for cut in cuts), len(text)]
    return [text[start:end] for start, end in zip(bounds, bounds[1:])]


def reasoning_events(output_index: int, item_id: str, summaries: list[list[str]]) -> list[dict[str, Any]]:
    where = {"item_id": item_id, "output_index": output_index}
    item = {"id": item_id, "type": "reasoning", "summary": []}
    events: list[dict[str, Any]] = [{"type": "response.output_item.added", "output_index": output_index,
                                     "item": item}]
    done = []
    for index, parts in enumerate(summaries):
        text = "".join(parts)
        events += [{"type": "response.reasoning_summary_part.added", **where, "summary_index": index,
                    "part": {"type": "summary_text", "text": ""}},
                   *({"type": "response.reasoning_summary_text.delta", **where, "summary_index": index,
                      "delta": part} for part in parts),
                   {"type": "response.reasoning_summary_text.done", **where, "summary_index": index, "text": text},
                   {"type": "response.reasoning_summary_part.done", **where, "summary_index": index,
                    "part": {"type": "summary_text", "text": text}}]
        done.append({"type": "summary_text", "text": text})
    events.append({"type": "response.output_item.done", "output_index": output_index,
                   "item": {**item, "summary": done}})
    return events


@st.composite
def items(draw: st.DrawFn, output_index: int) -> list[dict[str, Any]]:
    kind = draw(st.sampled_from(["message", "function_call", "reasoning", "web_search_call"]))
    if kind == "message":
        return message_events(output_index, f"msg_{output_index}", draw(pieces))
    if kind == "reasoning":
        return reasoning_events(output_index, f"rs_{output_index}", draw(st.lists(pieces, max_size=3)))
    if kind == "web_search_call":
        item = {"id": f"ws_{output_index}", "type": "web_search_call", "status": "in_progress"}
        where = {"item_id": item["id"], "output_index": output_index}
        return [{"type": "response.output_item.added", "output_index": output_index, "item": item},
                {"type": "response.web_search_call.searching", **where},
                {"type": "response.web_search_call.completed", **where},
                {"type": "response.output_item.done", "output_index": output_index,
                 "item": {**item, "status": "completed", "action": {"type": "search", "query": "q"}}}]
    arguments = json.dumps(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=4)))
    fragments = _cut(arguments, draw(st.lists(st.integers(0, len(arguments)), max_size=12)))
    return call_events(output_index, f"fc_{output_index}", f"call_{output_index}", "f", fragments)


@st.composite
def responses_streams(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Up to four output items, two function calls sometimes interleaved; then completed (with or without its
    output), incomplete, failed, cut anywhere, or ended by an error event."""
    drawn = [draw(items(index)) for index in range(draw(st.integers(0, 4)))]
    events = [response_event("response.created"), response_event("response.in_progress")]
    pairs = [number for number in range(len(drawn) - 1)
             if all(item[0]["item"]["type"] == "function_call" for item in drawn[number:number + 2])]
    if pairs and draw(st.booleans()):  # two consecutive calls, their argument deltas alternating
        number = draw(st.sampled_from(pairs))
        first, second = drawn[number:number + 2]
        deltas_a, deltas_b = first[1:-2], second[1:-2]
        mixed = [event for pair in zip(deltas_a, deltas_b) for event in pair]
        mixed += deltas_a[len(deltas_b):] + deltas_b[len(deltas_a):]
        drawn[number:number + 2] = [[first[0], second[0], *mixed, *first[-2:], *second[-2:]]]
    events += [event for item in drawn for event in item]
    output = [event["item"] for event in events if event["type"] == "response.output_item.done"]
    ending = draw(st.sampled_from(["completed", "no output", "incomplete", "failed", "cut", "error"]))
    usage = responses_usage(draw(st.integers(0, 10**5)), draw(st.integers(0, 10**5)))
    if ending in ("completed", "no output"):
        final = response_event("response.completed", "completed", output, usage=usage)
        if ending == "no output":
            del final["response"]["output"]
        events.append(final)
    elif ending == "incomplete":
        events.append(response_event("response.incomplete", "incomplete", output, usage=usage,
                                     incomplete_details={"reason": "max_output_tokens"}))
    elif ending == "failed":
        events.append(response_event("response.failed", "failed", output,
                                     error={"code": "server_error", "message": "failed"}))
    else:
        events = events[:draw(st.integers(1, len(events)))]
        if ending == "error":
            events.append({"type": "error", "code": "server_error", "message": "boom", "param": None})
    return [{**event, "sequence_number": number} for number, event in enumerate(events)]


@settings(max_examples=150, deadline=None)
@given(events=responses_streams())
def test_generated_streams_agree_with_the_sdk(events: list[dict[str, Any]]) -> None:
    assert_agree(events)
    follow(events)
    last = events[-1]["type"]
    status = assemble(events)["status"]
    assert status == ("failed" if last in ("error", "response.failed") else
                      "completed" if last in ("response.completed", "response.incomplete") else "incomplete")


def test_a_call_item_as_added_carries_no_arguments_yet() -> None:
    assert call_item("fc", "call", "f")["arguments"] == "" and message_item("m")["content"] == []
