"""Helpers for the native-dialect tests: the recorded streams of ``fixtures/native`` and small event builders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson

from worker import Assembler, assemble

NATIVE = Path(__file__).resolve().parents[2] / "fixtures" / "native"


def native_lines(dialect: str, name: str) -> list[bytes]:
    """The raw lines of a recorded native stream, as a producer would have pushed them."""
    return [line for line in (NATIVE / dialect / name).read_bytes().splitlines() if line.strip()]


def native_events(dialect: str, name: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in native_lines(dialect, name)]


def fixture_names(dialect: str) -> list[str]:
    return sorted(path.name for path in (NATIVE / dialect).glob("*.jsonl"))


def assert_fed_alike(dialect: str, name: str) -> None:
    """A recorded stream gives one record whether recognised, fed one by one, or its format forced."""
    lines = native_lines(dialect, name)
    assembler = Assembler()
    for line in lines:
        assembler.feed(line)
    assert assembler.result() == assemble(lines) == assemble(lines, format=dialect)  # type: ignore[arg-type]
    assert assembler.format == dialect


def clean_record(dialect: str, name: str) -> dict[str, Any]:
    """The record of a recorded stream, with what every clean recorded stream must give checked."""
    lines = native_lines(dialect, name)
    record = assemble(lines)
    assert record["format"] == dialect
    assert record["status"] == "completed"
    assert record["error"] is None
    assert record["warnings"] == []
    assert record["metrics"]["chunks"] == len(lines)
    return dict(record)


def snapshot(assembler: Assembler) -> str:
    """Everything an assembler would report, as text: equal snapshots mean an unchanged assembler.

    The standard library's JSON writer, unlike orjson's, takes any integer a dict fed directly may hold.
    """
    return json.dumps({"record": assembler.result(), "chunks": assembler.chunks}, sort_keys=True, default=repr)


# --- Anthropic Messages events ---------------------------------------------------------------------------

def message_start(usage: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    message = {"id": "msg_test", "type": "message", "role": "assistant", "model": "claude-test", "content": [],
               "stop_reason": None, "stop_sequence": None,
               "usage": usage if usage is not None else {"input_tokens": 10, "output_tokens": 1}, **extra}
    return {"type": "message_start", "message": message}


def block_start(index: int, block: dict[str, Any]) -> dict[str, Any]:
    return {"type": "content_block_start", "index": index, "content_block": block}


def block_delta(index: int, delta: dict[str, Any]) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": index, "delta": delta}


def block_stop(index: int) -> dict[str, Any]:
    return {"type": "content_block_stop", "index": index}


def text_block(index: int, pieces: list[str]) -> list[dict[str, Any]]:
    return [block_start(index, {"type": "text", "text": ""}),
            *(block_delta(index, {"type": "text_delta", "text": piece}) for piece in pieces), block_stop(index)]


def tool_block(index: int, call_id: str, name: str, fragments: list[str],
               kind: str = "tool_use") -> list[dict[str, Any]]:
    return [block_start(index, {"type": kind, "id": call_id, "name": name, "input": {}}),
            *(block_delta(index, {"type": "input_json_delta", "partial_json": part}) for part in fragments),
            block_stop(index)]


def message_end(stop_reason: str = "end_turn", usage: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return [{"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": None},
             "usage": usage if usage is not None else {"output_tokens": 20}},
            {"type": "message_stop"}]


# --- OpenAI Responses events ------------------------------------------------------------------------------

def response_event(kind: str, status: str = "in_progress", output: list[Any] | None = None,
                   **extra: Any) -> dict[str, Any]:
    response = {"id": "resp_test", "object": "response", "created_at": 1700000000, "status": status,
                "model": "gpt-test", "output": [] if output is None else output, "usage": None, **extra}
    return {"type": kind, "response": response}


def message_item(item_id: str, text: str | None = None) -> dict[str, Any]:
    """A message output item: as added (text None) or as done, with one output_text part."""
    if text is None:
        return {"id": item_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}
    return {"id": item_id, "type": "message", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def message_events(output_index: int, item_id: str, pieces: list[str]) -> list[dict[str, Any]]:
    """A message item streamed whole: added, one output_text part, its deltas, and every done event."""
    text = "".join(pieces)
    where = {"item_id": item_id, "output_index": output_index, "content_index": 0}
    return [{"type": "response.output_item.added", "output_index": output_index, "item": message_item(item_id)},
            {"type": "response.content_part.added", **where,
             "part": {"type": "output_text", "text": "", "annotations": []}},
            *({"type": "response.output_text.delta", **where, "delta": piece} for piece in pieces),
            {"type": "response.output_text.done", **where, "text": text},
            {"type": "response.content_part.done", **where,
             "part": {"type": "output_text", "text": text, "annotations": []}},
            {"type": "response.output_item.done", "output_index": output_index,
             "item": message_item(item_id, text)}]


def call_item(item_id: str, call_id: str, name: str, arguments: str = "",
              status: str = "in_progress") -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call_id, "name": name,
            "arguments": arguments}


def call_events(output_index: int, item_id: str, call_id: str, name: str,
                fragments: list[str]) -> list[dict[str, Any]]:
    arguments = "".join(fragments)
    where = {"item_id": item_id, "output_index": output_index}
    return [{"type": "response.output_item.added", "output_index": output_index,
             "item": call_item(item_id, call_id, name)},
            *({"type": "response.function_call_arguments.delta", **where, "delta": part} for part in fragments),
            {"type": "response.function_call_arguments.done", **where, "arguments": arguments},
            {"type": "response.output_item.done", "output_index": output_index,
             "item": call_item(item_id, call_id, name, arguments, "completed")}]


def responses_usage(prompt: int = 10, completion: int = 5) -> dict[str, Any]:
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + completion}


# --- Gemini chunks ------------------------------------------------------------------------------------------

def gemini_chunk(*parts: dict[str, Any], finish: str | None = None, index: int | None = None,
                 usage: dict[str, Any] | None = None) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": list(parts), "role": "model"}}
    if finish is not None:
        candidate["finishReason"] = finish
    if index is not None:
        candidate["index"] = index
    chunk: dict[str, Any] = {"candidates": [candidate]}
    if usage is not None:
        chunk["usageMetadata"] = usage
    return {**chunk, "modelVersion": "gemini-test", "responseId": "resp-test"}


def partial(path: str, **value: Any) -> dict[str, Any]:
    """One Vertex ``partialArgs`` entry: ``partial("$.city", stringValue="Par", willContinue=True)``."""
    return {"jsonPath": path, **value}


# --- what a follower may rely on ----------------------------------------------------------------------------

TEXT_FIELDS = ("content", "reasoning_content", "refusal")


def follow(events: list[Any], format: Any = None) -> Assembler:
    """Feed events one at a time and, after each, check the shared state against the follower contract of
    worker/choice.py: choices and calls only appear, texts and arguments only grow by appending, a call's
    id and name never change, ``done`` only turns true and nothing is appended after it."""
    assembler = Assembler(format=format)
    seen: dict[int, Any] = {}
    for event in events:
        assembler.feed(event)
        state = assembler.state
        assert set(seen) <= set(state.choices)
        for index, choice in state.choices.items():
            before = seen.get(index)
            if before is not None:
                assert before["choice"] is choice
                for name in TEXT_FIELDS:
                    parts = getattr(choice, name).parts
                    assert parts[:len(before[name])] == before[name]
                    assert getattr(choice, name).seen or not before[name + "_seen"]
                assert choice.calls[:len(before["calls"])] == [entry[0] for entry in before["calls"]]
                for call, identity, arguments, done in before["calls"]:
                    assert (call.id, call.type, call.name) == identity
                    assert call.arguments[:len(arguments)] == arguments
                    assert call.done or not done
                    assert not done or call.arguments == arguments
            seen[index] = {"choice": choice, **{name: list(getattr(choice, name).parts) for name in TEXT_FIELDS},
                           **{name + "_seen": getattr(choice, name).seen for name in TEXT_FIELDS},
                           "calls": [(call, (call.id, call.type, call.name), list(call.arguments), call.done)
                                     for call in choice.calls]}
        state.usage()
    return assembler
