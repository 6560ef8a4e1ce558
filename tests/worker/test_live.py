"""LiveFold: the events of a chunk stream add up to its result record, whatever the dialect, and resume exactly."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline_rig import RECORDED, recorded
from streamfold.contract import Fields, Mode, encode_chunk, encode_end, encode_start
from tests.conftest import SEEDS, load_jsonl
from worker import assemble
from worker.live import (AttemptRestarted, ChoiceFinished, Final, LiveEvent, LiveFold, TextDelta, ToolCallArguments,
                         ToolCallDone, ToolCallStarted, UsageReported, event_json, events_after, parse_token,
                         parsed_arguments)

STREAMS = {path.stem: load_jsonl(path) for directory in (RECORDED, SEEDS) for path in sorted(directory.glob("*.jsonl"))}
NATIVE = {path.stem: load_jsonl(path) for path in sorted((RECORDED.parent / "native").glob("*/*.jsonl"))}


def _entries(chunks: list[bytes], *, mode: Mode = "auto", attempt: int = 0, start: bool = True,
             end: bool = True) -> list[tuple[str, Fields]]:
    entries: list[dict[str, bytes]] = [encode_start({}, mode, attempt=0, ts_ms=1)] if start else []
    entries += [encode_chunk(chunk, seq=seq, attempt=attempt, ts_ms=2) for seq, chunk in enumerate(chunks)]
    if end:
        entries.append(encode_end(attempt=attempt, ts_ms=3))
    return _numbered(entries)


def _numbered(entries: list[dict[str, bytes]], first: int = 1) -> list[tuple[str, Fields]]:
    return [(f"{first + n}-0", {key.encode(): value for key, value in fields.items()})
            for n, fields in enumerate(entries)]


def _final(n: int) -> tuple[str, Fields]:
    return (f"{n}-0", {b"k": b"final", b"att": b"0", b"ts": b"4", b"d": b"completed"})


def follow(entries: list[tuple[str, Fields]]) -> list[LiveEvent]:
    fold = LiveFold("r1")
    events: list[LiveEvent] = []
    for entry_id, fields in entries:
        events += fold.feed(entry_id, fields)
    return events


def shown(events: list[LiveEvent]) -> dict[int, dict[str, Any]]:
    """What a follower ends up showing, choice by choice, after applying every event in order."""
    choices: dict[int, dict[str, Any]] = {}
    for event in events:
        if isinstance(event, AttemptRestarted):
            choices = {}
            continue
        if isinstance(event, (UsageReported, Final)):
            continue
        choice = choices.setdefault(event.choice, {"text": {}, "calls": {}, "finish": None})
        if isinstance(event, TextDelta):
            before = "" if event.reset else choice["text"].get(event.field, "")
            choice["text"][event.field] = before + event.text
        elif isinstance(event, ToolCallStarted):
            assert event.index not in choice["calls"]
            choice["calls"][event.index] = {"id": event.id, "name": event.name, "arguments": "", "done": None}
        elif isinstance(event, ToolCallArguments):
            call = choice["calls"][event.index]
            assert call["done"] is None, "arguments after the call was done"
            call["arguments"] += event.text
        elif isinstance(event, ToolCallDone):
            call = choice["calls"][event.index]
            assert (call["arguments"], call["done"]) == (event.arguments, None)
            call["done"] = event.parsed
        elif isinstance(event, ChoiceFinished):
            choice["finish"] = event.finish_reason
    return choices


def expected(record: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The same view, read from a result record."""
    choices = {}
    for choice in record["completion"]["choices"]:
        message = choice["message"]
        texts = {name: message[name] for name in ("reasoning_content", "reasoning", "content", "refusal")
                 if isinstance(message.get(name), str)}
        calls = {position: {"id": call["id"], "name": call["function"]["name"],
                            "arguments": call["function"]["arguments"],
                            "done": parsed_arguments(call["function"]["arguments"])}
                 for position, call in enumerate(message.get("tool_calls") or [])}
        choices[choice["index"]] = {"text": texts, "calls": calls, "finish": choice["finish_reason"]}
    return choices


@pytest.mark.parametrize("name", sorted(STREAMS))
@pytest.mark.parametrize("mode", ["auto", "incremental", "cumulative"])
def test_the_events_add_up_to_the_record_for_every_recorded_and_seed_stream(name: str, mode: Mode) -> None:
    chunks = STREAMS[name]
    events = follow(_entries(chunks, mode=mode))
    record = assemble(chunks, mode=mode)
    assert shown(events) == {index: choice for index, choice in expected(record).items()
                             if choice["text"] or choice["calls"] or choice["finish"]}
    usages = [event.usage for event in events if isinstance(event, UsageReported)]
    assert (usages[-1] if usages else None) == record["completion"]["usage"]


@pytest.mark.parametrize("name", sorted(NATIVE))
def test_native_streams_speak_the_same_vocabulary_and_add_up_to_the_record(name: str) -> None:
    chunks = NATIVE[name]
    events = follow(_entries(chunks))
    record = assemble(chunks)
    assert record["format"] != "chat"
    assert shown(events) == {index: choice for index, choice in expected(record).items()
                             if choice["text"] or choice["calls"] or choice["finish"]}
    usages = [event.usage for event in events if isinstance(event, UsageReported)]
    assert (usages[-1] if usages else None) == record["completion"]["usage"]
    tokens = [event.token for event in events]
    for position in range(0, len(events), max(1, len(events) // 7)):
        assert list(events_after(follow(_entries(chunks)), tokens[position])) == events[position + 1:]


def test_a_native_call_is_done_as_soon_as_its_block_closes_not_at_the_end() -> None:
    chunks = NATIVE["anthropic_parallel_tool_use"]
    fold = LiveFold("r1")
    done_at = []
    for entry_id, fields in _entries(chunks):
        if any(isinstance(event, ToolCallDone) for event in fold.feed(entry_id, fields)):
            done_at.append(entry_id)
    assert len(done_at) == 2 and done_at[0] != done_at[1]  # each when its content_block_stop came


@pytest.mark.parametrize("name", ["qwen_mt_plus_cumulative", "openai_parallel_tool_calls", "deepseek_reasoner_tool_call",
                                  "openai_n3_multiple_choices"])
def test_resuming_after_any_event_gives_exactly_the_events_after_it(name: str) -> None:
    entries = _entries(STREAMS[name])
    events = follow(entries)
    tokens = [event.token for event in events]
    assert tokens == sorted(tokens, key=parse_token) and len(set(tokens)) == len(tokens)
    for position, event in enumerate(events):
        assert list(events_after(follow(entries), event.token)) == events[position + 1:]


def test_cumulative_text_comes_out_as_increments_in_auto_and_cumulative_mode() -> None:
    chunks = STREAMS["qwen_mt_plus_cumulative"]
    for mode in ("auto", "cumulative"):
        deltas = [event.text for event in follow(_entries(chunks, mode=mode)) if isinstance(event, TextDelta)]
        assert "".join(deltas) == "I didn’t laugh after watching this video."
        if mode == "cumulative":  # shown as it comes; auto waits for the end that proves the stream cumulative
            assert deltas[:4] == ["", "I", " didn", "’t"]  # the first chunk sends the field, empty


def test_an_ordinary_stream_in_auto_mode_is_shown_as_it_comes() -> None:
    chunks = STREAMS["qwen_mt_flash_incremental"]
    fold = LiveFold("r1")
    entries = _entries(chunks)
    shown_before_end = [event for entry_id, fields in entries[:-1] for event in fold.feed(entry_id, fields)
                        if isinstance(event, TextDelta)]
    assert "".join(event.text for event in shown_before_end) == assemble(chunks)["completion"]["choices"][0][
        "message"]["content"]


def test_a_retried_upstream_call_restarts_what_was_shown() -> None:
    first, second = STREAMS["openai_refusal"], STREAMS["groq_tool_call_whole_args"]
    entries = _entries(first[:5], end=False) + _numbered(
        [encode_chunk(chunk, seq=seq, attempt=1, ts_ms=2) for seq, chunk in enumerate(second)]
        + [encode_end(attempt=1, ts_ms=3)], first=100)
    events = follow(entries)
    restarts = [index for index, event in enumerate(events) if isinstance(event, AttemptRestarted)]
    assert len(restarts) == 1 and events[restarts[0]].attempt == 1
    assert shown(events) == expected(assemble(second))


def test_duplicate_chunks_are_shown_once() -> None:
    chunks = STREAMS["openai_parallel_tool_calls"]
    again = [encode_chunk(chunks[seq], seq=seq, attempt=0, ts_ms=2) for seq in (3, 4, 10)]
    entries = _entries(chunks[:12], end=False) + _numbered(again, first=50) + _numbered(
        [encode_chunk(chunk, seq=seq, attempt=0, ts_ms=2) for seq, chunk in enumerate(chunks) if seq >= 12]
        + [encode_end(attempt=0, ts_ms=3)], first=60)
    assert shown(follow(entries)) == expected(assemble(chunks))


@pytest.mark.parametrize("name", ["mistral_tool_call_no_index", "doubao_tool_call_fragments", "openai_parallel_tool_calls"])
def test_index_less_or_index_0_parallel_calls_come_out_as_distinct_calls(name: str) -> None:
    events = follow(_entries(STREAMS[name]))
    started = [(event.index, event.id) for event in events if isinstance(event, ToolCallStarted)]
    record_calls = assemble(STREAMS[name])["completion"]["choices"][0]["message"]["tool_calls"]
    assert started == [(position, call["id"]) for position, call in enumerate(record_calls)]


def test_a_stream_without_an_end_is_closed_by_the_workers_final_entry() -> None:
    chunks = STREAMS["openai_parallel_tool_calls"]
    fold = LiveFold("r1")
    events = [event for entry_id, fields in _entries(chunks[:-2], end=False) for event in fold.feed(entry_id, fields)]
    assert not any(isinstance(event, ToolCallDone) for event in events)
    closing = fold.feed(*_final(99))
    assert fold.closed and [type(event) for event in closing] == [ToolCallDone, ToolCallDone]
    final = fold.final({"status": "incomplete"})
    assert isinstance(final, Final) and parse_token(final.token) > parse_token(closing[-1].token)


def test_a_choice_finishes_after_its_calls_are_done() -> None:
    events = follow(_entries(STREAMS["openai_parallel_tool_calls"]))
    kinds = [event.kind for event in events]
    assert kinds.index("finish") > max(index for index, kind in enumerate(kinds) if kind == "tool_call_done")


def test_every_event_is_one_json_object_named_by_its_kind() -> None:
    for event in follow(_entries(STREAMS["deepseek_reasoner_tool_call"])):
        assert event_json(event)["type"] == event.kind and event_json(event)["token"] == event.token


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=8),
       values=st.lists(st.text(alphabet="ab", max_size=4), min_size=1, max_size=8),
       mode=st.sampled_from(["auto", "incremental", "cumulative"]))
def test_any_text_stream_adds_up_to_the_record(cuts: list[int], values: list[str], mode: Mode) -> None:
    chunks = [b'{"choices":[{"index":0,"delta":{"content":"%s"}}]}' % value.encode() for value in values]
    chunks.append(b'{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}')
    record = assemble(chunks, mode=mode)
    assert shown(follow(_entries(chunks, mode=mode))) == {index: choice for index, choice in expected(record).items()}


def test_an_unknown_token_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="resume token"):
        parse_token("yesterday")
