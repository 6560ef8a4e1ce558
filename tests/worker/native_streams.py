"""Helpers for the native-dialect tests: the recorded streams of ``fixtures/native`` and small event builders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from worker import Assembler

NATIVE = Path(__file__).resolve().parents[2] / "fixtures" / "native"


def native_lines(dialect: str, name: str) -> list[bytes]:
    """The raw lines of a recorded native stream, as a producer would have pushed them."""
    return [line for line in (NATIVE / dialect / name).read_bytes().splitlines() if line.strip()]


def native_events(dialect: str, name: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in native_lines(dialect, name)]


def fixture_names(dialect: str) -> list[str]:
    return sorted(path.name for path in (NATIVE / dialect).glob("*.jsonl"))


def snapshot(assembler: Assembler) -> bytes:
    """Everything an assembler would report, as bytes: equal snapshots mean an unchanged assembler."""
    return orjson.dumps({"record": assembler.result(), "chunks": assembler.chunks}, option=orjson.OPT_SORT_KEYS)


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
