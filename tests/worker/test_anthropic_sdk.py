"""Streamfold against the official Anthropic SDK's accumulator, on every recorded stream and on generated ones.

The oracle is ``anthropic.lib.streaming._messages.accumulate_event``, fed the same events. Both must agree on
the content blocks (text, thinking and its signature, citations, tool inputs), the stop reason and the usage
counts. Where Streamfold differs on purpose, the test says so:

- a tool input cut off mid-JSON: the SDK keeps what its partial-JSON parser makes of it, Streamfold keeps the
  block's start input in ``native`` (and the raw fragments as the call's arguments, with a warning), since a
  guessed object is not what the model sent;
- ``message_delta`` usage: the SDK copies five known counts, Streamfold takes every count the event carries
  (each a running total), so a count the SDK does not know yet is not left behind;
- an ``error`` event: the SDK's accumulator ignores it (its stream raises instead); Streamfold fails the record.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from native_streams import (block_delta, block_start, block_stop, fixture_names, follow, message_end,
                            message_start, native_events)
from worker import assemble

anthropic_messages = pytest.importorskip("anthropic.lib.streaming._messages")

SDK_COUNTS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
              "server_tool_use", "output_tokens_details")


def sdk_message(events: list[dict[str, Any]]) -> Any:
    accumulate = anthropic_messages.accumulate_event
    keywords: dict[str, Any] = {"json_bufs": {}} if "json_bufs" in inspect.signature(accumulate).parameters else {}
    snapshot = None
    for event in events:
        snapshot = accumulate(event=event, current_snapshot=snapshot, **keywords)
    return snapshot


def assert_agree(events: list[dict[str, Any]]) -> None:
    record = assemble(events)
    sdk = sdk_message(events)
    native = record["native"]
    stopped = {event["index"] for event in events if event["type"] == "content_block_stop"}
    sdk_blocks = [block.to_dict() for block in sdk.content]
    assert len(native["content"]) == len(sdk_blocks)
    for index, (ours, theirs) in enumerate(zip(native["content"], sdk_blocks)):
        if "input" in theirs and index not in stopped:
            ours, theirs = {**ours, "input": None}, {**theirs, "input": None}  # cut mid-JSON: see the docstring
        assert ours == theirs
    assert native["stop_reason"] == sdk.stop_reason
    assert native["stop_sequence"] == sdk.stop_sequence
    sdk_usage = sdk.usage.to_dict()
    assert {key: native["usage"].get(key) for key in SDK_COUNTS if key in sdk_usage} == \
        {key: sdk_usage[key] for key in SDK_COUNTS if key in sdk_usage}

    message = record["completion"]["choices"][0]["message"]
    texts = [block.text for block in sdk.content if block.type == "text"]
    assert message["content"] == ("".join(texts) if texts else None)
    thinking = [block.thinking for block in sdk.content if block.type == "thinking"]
    assert message.get("reasoning_content") == ("".join(thinking) if thinking else None)
    tools = [(index, block) for index, block in enumerate(sdk.content) if block.type == "tool_use"]
    calls = message.get("tool_calls", [])
    assert [call["id"] for call in calls] == [block.id for _, block in tools]
    assert [call["function"]["name"] for call in calls] == [block.name for _, block in tools]
    for call, (index, block) in zip(calls, tools):
        if index in stopped:
            assert json.loads(call["function"]["arguments"]) == block.input


@pytest.mark.parametrize("name", fixture_names("anthropic"))
def test_every_recorded_stream_agrees_with_the_sdk(name: str) -> None:
    assert_agree(native_events("anthropic", name))


# --- generated streams ------------------------------------------------------------------------------------

texts = st.text(max_size=30)
pieces = st.lists(texts, max_size=6)
json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=10),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                        max_size=3), max_leaves=8)
tool_inputs = st.dictionaries(st.text(max_size=8), json_values, max_size=4)
counts = st.integers(0, 10**6)


def _cut(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(min(cut, len(text)) for cut in cuts), len(text)]
    return [text[start:end] for start, end in zip(bounds, bounds[1:])]


@st.composite
def blocks(draw: st.DrawFn, index: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """(start, deltas, stop) of one content block of a kind drawn at random."""
    kind = draw(st.sampled_from(["text", "thinking", "tool_use", "server_tool_use", "redacted_thinking"]))
    if kind == "text":
        deltas = [block_delta(index, {"type": "text_delta", "text": piece}) for piece in draw(pieces)]
        if draw(st.booleans()):
            citation = {"type": "char_location", "cited_text": draw(texts), "document_index": 0,
                        "start_char_index": 0, "end_char_index": 3}
            deltas.insert(draw(st.integers(0, len(deltas))), block_delta(index, {"type": "citations_delta",
                                                                                 "citation": citation}))
        return [block_start(index, {"type": "text", "text": ""})], deltas, block_stop(index)
    if kind == "thinking":
        deltas = [block_delta(index, {"type": "thinking_delta", "thinking": piece}) for piece in draw(pieces)]
        deltas.append(block_delta(index, {"type": "signature_delta", "signature": draw(st.text(min_size=1))}))
        return [block_start(index, {"type": "thinking", "thinking": "", "signature": ""})], deltas, block_stop(index)
    if kind == "redacted_thinking":
        return [block_start(index, {"type": kind, "data": draw(st.text(min_size=1))})], [], block_stop(index)
    arguments = json.dumps(draw(tool_inputs))
    fragments = ["", *_cut(arguments, draw(st.lists(st.integers(0, len(arguments)), max_size=12)))]
    if draw(st.booleans()):
        fragments = []  # a tool without arguments: no delta at all, or only the empty first one
    start = block_start(index, {"type": kind, "id": f"toolu_{index}", "name": draw(st.sampled_from(["f", "g"])),
                                "input": {}})
    return [start], [block_delta(index, {"type": "input_json_delta", "partial_json": part})
                     for part in fragments], block_stop(index)


@st.composite
def anthropic_streams(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A message of up to five blocks, two of them sometimes interleaved, pings anywhere; then whole, cut
    anywhere, or ended by an error event."""
    start_usage = {"input_tokens": draw(counts), "output_tokens": draw(st.integers(0, 5))}
    if draw(st.booleans()):
        start_usage.update(cache_read_input_tokens=draw(counts), cache_creation_input_tokens=draw(counts))
    events = [message_start(start_usage)]
    drawn = [draw(blocks(index)) for index in range(draw(st.integers(0, 5)))]
    # Two tool blocks streaming at once, their deltas alternating. (The API streams one block at a time; text
    # blocks interleaved so would join in the order their pieces came, the only order a text can grow in.)
    if len(drawn) >= 2 and all("input" in start[0]["content_block"] for start, _, _ in drawn[-2:]) \
            and draw(st.booleans()):
        (start_a, deltas_a, stop_a), (start_b, deltas_b, stop_b) = drawn[-2:]
        mixed = [delta for pair in zip(deltas_a, deltas_b) for delta in pair]
        longer = deltas_a if len(deltas_a) > len(deltas_b) else deltas_b
        drawn[-2:] = [(start_a + start_b, mixed + longer[len(mixed) // 2:], stop_a), ([], [], stop_b)]
    for starts, deltas, stop in drawn:
        events += [*starts, *deltas, stop]
    end_usage: dict[str, Any] = {"output_tokens": draw(counts)}
    if draw(st.booleans()):
        end_usage["input_tokens"] = draw(counts)
    events += message_end(draw(st.sampled_from(["end_turn", "max_tokens", "tool_use", "stop_sequence"])), end_usage)
    for _ in range(draw(st.integers(0, 3))):
        events.insert(draw(st.integers(1, len(events))), {"type": "ping"})
    ending = draw(st.sampled_from(["whole", "cut", "error"]))
    if ending != "whole":
        events = events[:draw(st.integers(1, len(events)))]
    if ending == "error":
        events.append({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    return events


@settings(max_examples=150, deadline=None)
@given(events=anthropic_streams())
def test_generated_streams_agree_with_the_sdk(events: list[dict[str, Any]]) -> None:
    assert_agree(events)
    follow(events)
    kinds = [event["type"] for event in events]
    status = "failed" if "error" in kinds else "completed" if "message_stop" in kinds else "incomplete"
    assert assemble(events)["status"] == status
