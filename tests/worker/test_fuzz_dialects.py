"""Every dialect fed garbage: recorded streams mutated at random, and random lines.

For every event fed, the Assembler either applies it or raises ``ChunkError`` naming the event's position
and leaving everything as it was; nothing else may escape, and the record can always be built. The nastiest
cases the fuzzing found are kept as plain tests at the end. ``STREAMFOLD_FUZZ_EXAMPLES`` raises the number of
examples for a longer run by hand (default 40 per dialect, to keep the suite quick).
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import RECORDED, load_jsonl
from native_streams import fixture_names, gemini_chunk, message_start, native_events, partial, response_event, snapshot
from streamfold.errors import ChunkError
from worker import Assembler

EXAMPLES = int(os.environ.get("STREAMFOLD_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                             HealthCheck.data_too_large])
LONGEST = 24  # events per fuzzed stream: every event is snapshotted before it is fed


def _streams(dialect: str) -> list[list[dict[str, Any]]]:
    if dialect == "chat":
        paths = sorted(RECORDED.glob("*.jsonl"))
        return [[orjson.loads(line) for line in load_jsonl(path)][:LONGEST] for path in paths]
    return [native_events(dialect, name)[:LONGEST] for name in fixture_names(dialect)]


STREAMS = {dialect: _streams(dialect) for dialect in ("chat", "anthropic", "responses", "gemini")}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                    st.text(max_size=8), st.sampled_from(["", "text", "text_delta", "function_call", "STOP",
                                                          "content_block_delta", "response.output_text.delta"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                          max_size=3), max_leaves=6)


def _containers(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a dict or list inside ``value``, the value itself first."""
    found = [path]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        if isinstance(inner, (dict, list)):
            found += _containers(inner, (*path, key))
    return found


def _at(value: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        value = value[key]
    return value


@st.composite
def mutated_streams(draw: st.DrawFn, dialect: str) -> list[Any]:
    """A recorded stream with values replaced, keys dropped or added, events dropped, repeated, moved, or
    garbage put in, a few times over."""
    events: list[Any] = copy.deepcopy(draw(st.sampled_from(STREAMS[dialect])))
    for _ in range(draw(st.integers(1, 5))):
        operation = draw(st.sampled_from(["replace", "replace", "delete", "insert", "drop", "repeat", "move",
                                          "garbage"]))
        if not events:
            events.append(draw(values))
            continue
        number = draw(st.integers(0, len(events) - 1))
        event = events[number]
        if operation in ("replace", "delete", "insert") and isinstance(event, (dict, list)):
            path = draw(st.sampled_from(_containers(event)))
            target = _at(event, path)
            if isinstance(target, dict) and target and operation != "insert":
                key = draw(st.sampled_from(sorted(target)))
                if operation == "delete":
                    del target[key]
                else:
                    target[key] = draw(values)
            elif isinstance(target, list) and target and operation != "insert":
                target[draw(st.integers(0, len(target) - 1))] = draw(values)
            elif isinstance(target, dict):
                target[draw(st.sampled_from(["type", "index", "delta", "text", "candidates", "parts", "x"]))] = \
                    draw(values)
            else:
                target.append(draw(values))
        elif operation == "drop":
            del events[number]
        elif operation == "repeat":
            events.insert(number, copy.deepcopy(event))
        elif operation == "move":
            events.insert(draw(st.integers(0, len(events) - 1)), events.pop(number))
        else:
            events.insert(number, draw(st.one_of(values, st.binary(max_size=20), st.text(max_size=20),
                                                 st.sampled_from(["data: [DONE]", "event: error", ": ping", "",
                                                                  "data: {", "[1, 2]", "null"]))))
    return events


def feed_all(assembler: Assembler, events: list[Any]) -> None:
    """Feed every event; each is applied, or rejected with its position and no change at all."""
    for position, event in enumerate(events):
        before = snapshot(assembler)
        raw = event if isinstance(event, (bytes, str, dict)) else json.dumps(event)
        try:
            assembler.feed(raw)
        except ChunkError as exc:
            assert exc.position == position
            assert str(exc).startswith(f"chunk {position}: ")
            assert snapshot(assembler) == before
    assembler.result()


@pytest.mark.parametrize("dialect", sorted(STREAMS))
@FUZZ
@given(data=st.data())
def test_a_mutated_stream_is_applied_or_rejected_event_by_event(dialect: str, data: st.DataObject) -> None:
    events = data.draw(mutated_streams(dialect))
    feed_all(Assembler(), events)
    feed_all(Assembler(format=dialect), events)  # type: ignore[arg-type]


@FUZZ
@given(events=st.lists(st.one_of(values, st.binary(max_size=30), st.text(max_size=30)), max_size=10),
       dialect=st.sampled_from([None, "chat", "anthropic", "responses", "gemini"]))
def test_random_events_are_applied_or_rejected_event_by_event(events: list[Any], dialect: Any) -> None:
    feed_all(Assembler(format=dialect), events)


# --- the nastiest cases found, kept -------------------------------------------------------------------------


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def _chat_call(arguments: Any) -> dict[str, Any]:
    return {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [
        {"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c", "type": "function",
                                                "function": {"name": "f", "arguments": arguments}}]}}]}


NASTY = {
    # object arguments orjson cannot write back as text: nested past its 255 levels, an integer past 64 bits
    "chat arguments nested 300 deep": ("chat", [json.dumps(_chat_call(_nested(300)))]),
    "chat arguments with a 70-bit integer, fed as a dict": ("chat", [_chat_call({"n": 2**70})]),
    "anthropic tool input nested 300 deep, no input_json_delta": ("anthropic", [
        message_start(), {"type": "content_block_start", "index": 0,
                          "content_block": {"type": "tool_use", "id": "t", "name": "f", "input": _nested(300)}},
        {"type": "content_block_stop", "index": 0}]),
    "gemini function call args nested 300 deep": ("gemini", [
        json.dumps(gemini_chunk({"functionCall": {"name": "f", "args": _nested(300)}}))]),
    "gemini partialArgs path deeper than allowed": ("gemini", [gemini_chunk(
        {"functionCall": {"name": "f", "partialArgs": [partial("$" + ".a" * 65, numberValue=1)]}})]),
    "gemini partialArgs index past the limit": ("gemini", [gemini_chunk(
        {"functionCall": {"name": "f", "partialArgs": [partial("$.a[10001]", numberValue=1)]}})]),
    # an unhashable type where a name is looked up in a table
    "a list as the event type": ("anthropic", [{"type": ["message_start"]}]),
    "a list as a content block delta's type": ("anthropic", [
        message_start(), {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": ["text_delta"], "text": "x"}}]),
    "a list as a Responses output_index": ("responses", [
        response_event("response.created"), {"type": "response.output_text.delta", "output_index": [0],
                                             "content_index": 0, "delta": "x"}]),
    # null where an object was expected, after the checks had let it through as absent
    "gemini candidate content null": ("gemini", [{"candidates": [{"content": None}]}]),
    "an error event whose error is nested 300 deep": ("anthropic", [
        message_start(), {"type": "error", "error": {"type": "x", "detail": None, **_nested(300)}}]),
}


@pytest.mark.parametrize("case", sorted(NASTY))
def test_the_nastiest_cases_found_are_rejected_or_applied_cleanly(case: str) -> None:
    dialect, events = NASTY[case]
    feed_all(Assembler(), events)
    feed_all(Assembler(format=dialect), events)  # type: ignore[arg-type]


def test_an_object_argument_orjson_cannot_write_is_rejected_by_name() -> None:
    with pytest.raises(ChunkError, match=r"tool_calls\[0\].function.arguments must be writable as JSON"):
        Assembler().feed(json.dumps(_chat_call(_nested(300))))
