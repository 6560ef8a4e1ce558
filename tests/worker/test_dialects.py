"""What holds for every dialect: how a stream's dialect is picked, what a start envelope's format does, and
usage events that carry the same normalized counts whatever the provider."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from native_streams import (NATIVE, assert_fed_alike, fixture_names, follow, gemini_chunk, message_start,
                            native_lines, response_event, snapshot, text_block)
from pipeline_rig import recorded
from streamfold.contract import FORMATS, decode_envelope, decode_start, encode_chunk, encode_end, encode_start
from streamfold.errors import ChunkError, ContractError
from worker import Assembler, assemble
from worker.cli import main
from worker.dialects import DIALECTS
from worker.request import RequestState

NATIVE_FIXTURES = [(dialect, name) for dialect in ("anthropic", "responses", "gemini")
                   for name in fixture_names(dialect)]


def test_the_wire_names_every_dialect_the_worker_has() -> None:
    assert sorted(DIALECTS) == sorted(FORMATS)


@pytest.mark.parametrize(("dialect", "name"), NATIVE_FIXTURES)
def test_a_recorded_stream_is_recognised_fed_one_by_one_or_forced_alike(dialect: str, name: str) -> None:
    assert_fed_alike(dialect, name)


@pytest.mark.parametrize(("first", "dialect"), [
    (recorded("openai_refusal")[0], "chat"), (message_start(), "anthropic"), ({"type": "ping"}, "anthropic"),
    (response_event("response.created"), "responses"), (gemini_chunk({"text": "a"}), "gemini"),
    ({"usageMetadata": {"promptTokenCount": 1}}, "gemini"),
    ({"type": "error", "error": {"type": "overloaded_error", "message": "x"}}, "anthropic"),
    ({"type": "error", "code": "server_error", "message": "x"}, "responses"),
    ({"error": {"message": "x"}}, "chat"),
])
def test_the_first_event_tells_the_dialect(first: Any, dialect: str) -> None:
    assert assemble([first])["format"] == dialect


def test_a_forced_format_rejects_another_dialects_events_and_changes_nothing() -> None:
    assembler = Assembler(format="gemini")
    assembler.feed(gemini_chunk({"text": "a"}))
    before = snapshot(assembler)
    for event in [message_start(), recorded("openai_refusal")[0]]:
        with pytest.raises(ChunkError):
            assembler.feed(event)
    assert snapshot(assembler) == before


def test_a_rejected_first_event_leaves_the_dialect_still_to_be_recognised() -> None:
    assembler = Assembler()
    before = snapshot(assembler)
    with pytest.raises(ChunkError, match="block 0, which never started"):
        assembler.feed({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x"}})
    assert snapshot(assembler) == before
    for chunk in recorded("openai_refusal"):
        assembler.feed(chunk)
    assert assembler.format == "chat" and assembler.result()["status"] == "completed"


def test_an_unknown_format_is_refused_where_it_is_named() -> None:
    with pytest.raises(ValueError, match="unknown format"):
        Assembler(format="bedrock")  # type: ignore[arg-type]
    with pytest.raises(ContractError, match="unknown stream format"):
        encode_start({}, "auto", attempt=0, ts_ms=1, format="bedrock")  # type: ignore[arg-type]
    bad = {b"k": b"start", b"att": b"0", b"ts": b"1", b"d": b'{"meta": {}, "mode": "auto", "format": "bedrock"}'}
    with pytest.raises(ContractError, match="bad start envelope"):
        decode_start(decode_envelope(bad))


def test_a_start_without_a_format_leaves_it_to_the_stream() -> None:
    fields = encode_start({}, "auto", attempt=0, ts_ms=1)
    assert b"format" not in fields["d"]
    envelope = decode_envelope({key.encode(): value for key, value in fields.items()})
    assert decode_start(envelope).format is None


def _finish(chunks: list[bytes], format: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """A request through RequestState as a worker sees it: start (naming the format or not), chunks, end."""
    state = RequestState("r1", "1-0", 100.0)
    entries = [encode_start({"tenant": "acme"}, "auto", attempt=0, ts_ms=1_000, format=format),
               *(encode_chunk(raw, seq=seq, attempt=0, ts_ms=1_000 + seq) for seq, raw in enumerate(chunks)),
               encode_end(attempt=0, ts_ms=2_000)]
    for number, fields in enumerate(entries):
        state.feed(f"{number + 1}-0", {key.encode(): value for key, value in fields.items()}, 100.0)
    outcome = state.outcome(finished_at_ms=3_000)
    return dict(outcome.record), dict(outcome.usage)


def test_the_start_envelopes_format_is_the_one_assembled() -> None:
    record, usage = _finish(native_lines("anthropic", "anthropic_text_basic.jsonl"), "anthropic")
    assert (record["format"], usage["format"], record["status"]) == ("anthropic", "anthropic", "completed")
    record, usage = _finish(native_lines("anthropic", "anthropic_text_basic.jsonl"), "gemini")
    assert record["status"] == "failed" and record["error"]["type"] == "invalid_chunk"


@pytest.mark.parametrize(("dialect", "name", "counts", "details", "key"), [
    ("chat", "openai_parallel_tool_calls.jsonl", (149, 60, 209), (None, {"reasoning_tokens": 0}), None),
    ("anthropic", "anthropic_thinking_then_tool_use_no_args.jsonl", (598, 92, 690),
     ({"cached_tokens": 0, "cache_write_tokens": 0}, {"reasoning_tokens": 53}), "usage"),
    ("responses", "responses_text_then_function_call_phase.jsonl", (63, 69, 132),
     ({"cache_write_tokens": 0, "cached_tokens": 0}, {"reasoning_tokens": 26}), "usage"),
    ("gemini", "gemini_code_execution.jsonl", (796, 717, 1513), (None, {"reasoning_tokens": 240}), "usageMetadata"),
])
def test_usage_events_carry_the_same_normalized_counts_and_the_providers_usage_verbatim(
        dialect: str, name: str, counts: tuple[int, int, int], details: tuple[Any, Any], key: str | None) -> None:
    lines = recorded(name[:-6]) if dialect == "chat" else native_lines(dialect, name)
    record, usage = _finish(lines)
    assert usage["format"] == dialect
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == counts
    assert (usage["prompt_tokens_details"], usage["completion_tokens_details"]) == details
    if dialect == "chat":
        assert usage["usage"] == orjson.loads(lines[-1])["usage"]
    else:
        assert usage["usage"] == record["native"][key]  # the provider's own, as its API reports it
    own = {name for name in usage if not name.startswith(("gen_ai.", "error."))}  # OTel names: where known
    assert own == {name for name in _finish(recorded("openai_refusal"))[1] if not name.startswith("gen_ai.")}


def test_anthropic_cache_writes_and_reads_count_into_prompt_tokens_of_the_usage_event() -> None:
    start = {"input_tokens": 5, "cache_read_input_tokens": 1000, "cache_creation_input_tokens": 200,
             "output_tokens": 1}
    events = [message_start(start), *text_block(0, ["ok"]),
              {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}},
              {"type": "message_stop"}]
    _, usage = _finish([orjson.dumps(event) for event in events])
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (1205, 3, 1208)
    assert usage["prompt_tokens_details"] == {"cached_tokens": 1000, "cache_write_tokens": 200}
    assert usage["usage"] == {**start, "output_tokens": 3}


def test_the_assemble_command_takes_a_format(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    path = str(NATIVE / "gemini" / "gemini_text_usage_every_chunk.jsonl")
    for arguments in (["assemble", path], ["assemble", "--format", "gemini", path]):
        assert main(arguments) == 0
        assert orjson.loads(capsysbinary.readouterr().out)["format"] == "gemini"
    assert main(["assemble", "--format", "anthropic", path]) == 1
    assert b"not an Anthropic stream event" in capsysbinary.readouterr().err


@pytest.mark.parametrize(("dialect", "name"), NATIVE_FIXTURES)
def test_a_follower_of_a_recorded_stream_sees_texts_and_calls_only_grow(dialect: str, name: str) -> None:
    assembler = follow(native_lines(dialect, name))
    assert assembler.result() == assemble(native_lines(dialect, name))
    calls = [call for choice in assembler.state.choices.values() for call in choice.calls]
    assert all(call.done for call in calls)  # every native dialect says when a call is complete
