"""RequestState: which envelopes count, when a request ends, and what its finish publishes. No Redis."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline_rig import recorded
from streamfold.contract import Fields, encode_chunk, encode_end, encode_error, encode_start
from worker import Assembler, assemble
from worker.limits import Limits
from worker.request import RequestState


class Stream:
    """Feeds envelopes to one RequestState, numbering entry ids and keeping the worker's clock."""

    def __init__(self, now: float = 100.0) -> None:
        self.state = RequestState("r1", "1-0", now)
        self.now = now
        self.ids = 0

    def entry(self, fields: dict[str, bytes], *, after: float = 0.0) -> bool:
        self.now += after
        self.ids += 1
        return self.state.feed(f"{self.ids}-0", _fields(fields), self.now)

    def start(self, meta: dict[str, Any] | None = None, mode: Any = "auto", ts: int = 1_000) -> bool:
        return self.entry(encode_start(meta or {}, mode, attempt=0, ts_ms=ts))

    def chunk(self, raw: bytes, seq: int, attempt: int = 0, ts: int = 1_000) -> bool:
        return self.entry(encode_chunk(raw, seq=seq, attempt=attempt, ts_ms=ts))

    def chunks(self, raws: list[bytes], attempt: int = 0, ts: int = 1_000) -> None:
        for seq, raw in enumerate(raws):
            self.chunk(raw, seq, attempt, ts)

    def end(self, attempt: int = 0, ts: int = 1_000, chunks: int | None = None) -> bool:
        return self.entry(encode_end(attempt=attempt, ts_ms=ts, chunks=chunks))


def _fields(fields: dict[str, bytes]) -> Fields:
    return {key.encode(): value for key, value in fields.items()}


def test_envelopes_in_order_assemble_exactly_as_assemble_does() -> None:
    chunks = recorded("openai_parallel_tool_calls")
    stream = Stream()
    stream.start(meta={"tenant": "acme"})
    stream.chunks(chunks)
    assert stream.end()
    record = stream.state.outcome(finished_at_ms=2_000).record
    expected = assemble(chunks, request_id="r1", meta={"tenant": "acme"})
    assert record["completion"] == expected["completion"]
    assert (record["status"], record["meta"], record["warnings"]) == ("completed", {"tenant": "acme"}, [])


def test_a_repeated_seq_is_a_duplicate_and_is_dropped() -> None:
    chunks = recorded("openai_refusal")
    stream = Stream()
    stream.start()
    for seq, raw in enumerate(chunks):
        stream.chunk(raw, seq)
        stream.chunk(raw, seq)
        if seq:
            stream.chunk(chunks[seq - 1], seq - 1)
    stream.end()
    record = stream.state.outcome(2_000).record
    assert record["completion"] == assemble(chunks)["completion"]
    assert record["metrics"]["duplicates"] == 2 * len(chunks) - 1
    assert record["metrics"]["chunks"] == len(chunks)


def test_a_higher_attempt_starts_over_so_attempts_never_mix() -> None:
    first, second = recorded("openai_refusal"), recorded("openai_parallel_tool_calls")
    stream = Stream()
    stream.start()
    stream.chunks(first[:5], attempt=0)
    stream.chunks(second, attempt=1)
    stream.end(attempt=1)
    record = stream.state.outcome(2_000).record
    assert record["completion"] == assemble(second)["completion"]
    assert record["metrics"]["attempts"] == 2
    assert record["warnings"] == ["attempt 1 replaced attempt 0 after 5 chunks"]


def test_envelopes_of_an_older_attempt_are_ignored() -> None:
    chunks = recorded("openai_refusal")
    stream = Stream()
    stream.start()
    stream.chunks(chunks[:3], attempt=1)
    stream.chunk(b'{"choices": [{"index": 0, "delta": {"content": "stale"}}]}', 7, attempt=0)
    assert not stream.end(attempt=0)
    stream.chunks(chunks, attempt=1)
    assert stream.end(attempt=1)
    record = stream.state.outcome(2_000).record
    assert record["completion"] == assemble(chunks)["completion"]
    assert record["metrics"]["duplicates"] == 3 + 2


def test_a_seq_gap_is_applied_but_the_request_can_only_end_incomplete() -> None:
    chunks = recorded("openai_refusal")
    stream = Stream()
    stream.start()
    for seq, raw in enumerate(chunks):
        if seq not in (4, 5):
            stream.chunk(raw, seq)
    stream.end()
    record = stream.state.outcome(2_000).record
    assert assemble(chunks)["status"] == "completed"
    assert record["status"] == "incomplete"
    assert record["warnings"] == ["attempt 0: chunks 4..5 missing; the output cannot be complete"]
    assert record["metrics"]["chunks"] == len(chunks) - 2


@pytest.mark.parametrize(("sent", "told", "status", "warnings"), [
    (13, 13, "completed", []),
    (13, None, "completed", []),  # a producer that does not count: nothing to check against
    (11, 13, "incomplete", ["attempt 0: chunks 11..12 missing; the output cannot be complete"]),
    (0, 2, "incomplete", ["attempt 0: chunks 0..1 missing; the output cannot be complete"]),
])
def test_an_end_that_counts_more_chunks_than_came_ends_the_request_incomplete(
        sent: int, told: int | None, status: str, warnings: list[str]) -> None:
    """The last chunks of an attempt lost (a failover losing writes its primary had acknowledged) leave no gap
    for the seqs to show: the end's count of the attempt's chunks does."""
    chunks = recorded("openai_refusal")
    assert len(chunks) == 13
    stream = Stream()
    stream.start()
    stream.chunks(chunks[:sent])
    stream.end(chunks=told)
    record = stream.state.outcome(2_000).record
    assert (record["status"], record["warnings"]) == (status, warnings)


def test_an_error_envelope_fails_the_request_and_keeps_the_partial_output() -> None:
    chunks = recorded("openai_refusal")
    stream = Stream()
    stream.start()
    stream.chunks(chunks[:4])
    assert stream.entry(encode_error({"message": "overloaded", "type": "server_error", "status": 529, "code": None},
                                     attempt=0, ts_ms=1_500))
    outcome = stream.state.outcome(2_000)
    assert outcome.record["status"] == "failed"
    assert outcome.record["error"] == {"message": "overloaded", "type": "server_error", "status": 529, "code": None}
    assert outcome.record["completion"] == assemble(chunks[:4])["completion"]
    assert outcome.usage["error_type"] == "server_error"
    assert outcome.dead_letter is None


def test_a_chunk_the_assembler_rejects_is_dead_lettered_and_fails_the_request() -> None:
    chunks = recorded("openai_refusal")
    stream = Stream()
    stream.start()
    stream.chunks(chunks[:3])
    assert stream.chunk(b"{not json", 3)
    assert stream.chunk(chunks[3], 4)  # ended: nothing after the poison entry is applied
    outcome = stream.state.outcome(2_000)
    assert outcome.dead_letter is not None
    assert (outcome.dead_letter.entry_id, outcome.dead_letter.payload) == ("5-0", b"{not json")
    assert outcome.dead_letter.reason.startswith("seq 3: not JSON")
    assert outcome.record["status"] == "failed"
    assert outcome.record["error"]["type"] == "invalid_chunk"
    assert outcome.record["completion"] == assemble(chunks[:3])["completion"]


def test_a_chunk_that_trips_a_fault_in_the_assembler_fails_only_its_request(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Assembler, chunk: bytes) -> None:
        raise RuntimeError("bug")

    stream = Stream()
    stream.start()
    monkeypatch.setattr(Assembler, "feed", broken)
    assert stream.chunk(b"{}", 0)
    outcome = stream.state.outcome(2_000)
    assert outcome.record["error"]["type"] == "assembler_error"
    assert outcome.dead_letter is not None and outcome.dead_letter.reason == "seq 0: RuntimeError: bug"


@pytest.mark.parametrize("count", [b"-1", b"two", b"99999999999999999999"])
def test_an_end_whose_chunk_count_is_not_one_is_dead_lettered(count: bytes) -> None:
    stream = Stream()
    stream.start()
    assert stream.entry({"k": b"end", "att": b"0", "ts": b"1", "n": count})
    assert stream.state.outcome(2_000).record["error"]["type"] == "invalid_envelope"


def test_an_entry_that_is_not_an_envelope_is_dead_lettered() -> None:
    stream = Stream()
    stream.start()
    assert stream.entry({"k": b"chunk", "att": b"zero", "ts": b"1", "seq": b"0", "d": b"{}"})
    outcome = stream.state.outcome(2_000)
    assert outcome.dead_letter is not None and outcome.dead_letter.payload == b"{}"
    assert outcome.record["error"]["type"] == "invalid_envelope"


def test_silence_for_the_stall_timeout_ends_the_request_incomplete_even_with_finish_reasons() -> None:
    chunks = recorded("groq_tool_call_whole_args")
    stream = Stream(now=100.0)
    stream.start()
    stream.chunks(chunks)  # every choice has its finish_reason, but the end marker never comes
    assert not stream.state.check_stall(now=159.9, stall_timeout=60)
    assert stream.state.check_stall(now=160.0, stall_timeout=60)
    record = stream.state.outcome(2_000).record
    assert record["status"] == "incomplete"
    assert record["warnings"] == ["stalled: no new entry for 60 s; finished without an end marker"]
    assert record["metrics"]["duration_ms"] is None


def test_the_stall_clock_starts_at_the_claim_and_moves_with_every_entry() -> None:
    stream = Stream(now=100.0)
    assert stream.state.stall_deadline(10) == 110.0
    stream.start()
    stream.chunk(b"{}", 0)
    stream.entry(encode_chunk(b"{}", seq=1, attempt=0, ts_ms=1), after=7.0)
    assert stream.state.stall_deadline(10) == 117.0


def test_a_second_start_envelope_is_ignored() -> None:
    stream = Stream()
    stream.start(meta={"tenant": "a"}, mode="cumulative")
    stream.start(meta={"tenant": "b"})
    stream.end()
    assert stream.state.outcome(2_000).record["meta"] == {"tenant": "a"}


def test_timings_come_from_the_producer_timestamps() -> None:
    stream = Stream()
    stream.start(ts=10_000)
    stream.chunk(b'{"choices": [{"index": 0, "delta": {"content": "hi"}}]}', 0, ts=10_250)
    stream.chunk(b'{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}', 1, ts=10_900)
    stream.end(ts=11_000)
    outcome = stream.state.outcome(finished_at_ms=11_004)
    metrics = outcome.record["metrics"]
    assert (metrics["ttft_ms"], metrics["duration_ms"], metrics["finish_lag_ms"]) == (250, 1_000, 4)
    assert (outcome.usage["ttft_ms"], outcome.usage["latency_ms"]) == (250, 1_000)


def test_the_usage_event_keeps_the_upstreams_token_counts_and_meta() -> None:
    chunks = recorded("xai_grok_reasoning_tool_call")  # total_tokens 560 is not prompt 307 + completion 26
    stream = Stream()
    stream.start(meta={"tenant": "acme", "route": "chat"})
    stream.chunks(chunks)
    stream.end()
    usage = stream.state.outcome(finished_at_ms=5_000).usage
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (307, 26, 560)
    assert usage["usage"] == orjson.loads(chunks[-1])["usage"]
    assert (usage["model"], usage["status"], usage["chunks"]) == ("grok-3-mini", "completed", len(chunks))
    assert (usage["meta"], usage["finished_at_ms"], usage["error_type"]) == ({"tenant": "acme", "route": "chat"},
                                                                              5_000, None)


def test_a_stream_without_usage_reports_no_token_counts() -> None:
    stream = Stream()
    stream.start()
    stream.chunk(b'{"model": "m", "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}', 0)
    stream.end()
    usage = stream.state.outcome(2_000).usage
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"], usage["usage"]) == (
        None, None, None, None)


@settings(max_examples=50, deadline=None)
@given(resends=st.lists(st.tuples(st.integers(min_value=0, max_value=24), st.integers(min_value=0, max_value=24)),
                        max_size=30))
def test_any_resent_chunks_give_the_same_record_as_the_clean_stream(resends: list[tuple[int, int]]) -> None:
    chunks = recorded("openai_parallel_tool_calls")
    stream = Stream()
    stream.start()
    for seq, raw in enumerate(chunks):
        stream.chunk(raw, seq)
        for after, again in resends:
            if after == seq and again <= seq:
                stream.chunk(chunks[again], again)
    stream.end()
    record = stream.state.outcome(2_000).record
    assert record["completion"] == assemble(chunks)["completion"]
    assert (record["status"], record["warnings"], record["metrics"]["chunks"]) == ("completed", [], len(chunks))


def test_a_record_that_cannot_be_encoded_is_replaced_by_a_failed_one(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = iter([TypeError("Recursion limit reached")])

    def encode_once_failing(record: Any) -> bytes:
        error = next(calls, None)
        if error is not None:
            raise error
        return orjson.dumps(record)

    monkeypatch.setattr("worker.request.encode_record", encode_once_failing)
    stream = Stream()
    stream.start(meta={"tenant": "acme"})
    stream.chunks(recorded("openai_refusal"))
    stream.end()
    outcome = stream.state.outcome(2_000)
    assert orjson.loads(outcome.encoded_record) == outcome.record
    assert (outcome.record["status"], outcome.record["error"]["type"]) == ("failed", "worker_error")
    assert "Recursion limit reached" in outcome.record["error"]["message"]
    assert (outcome.record["meta"], outcome.usage["meta"]) == ({"tenant": "acme"}, {"tenant": "acme"})
    assert orjson.loads(outcome.encoded_usage)["error_type"] == "worker_error"


@pytest.mark.parametrize(("limits", "setting"), [
    (Limits(chunk_bytes=1_024), "STREAMFOLD_MAX_CHUNK_BYTES=1024"),
    (Limits(chunks=5), "STREAMFOLD_MAX_CHUNKS=5"),
    (Limits(request_bytes=2_000), "STREAMFOLD_MAX_REQUEST_BYTES=2000"),
    (Limits(json_depth=8), "STREAMFOLD_MAX_JSON_DEPTH=8"),
])
def test_crossing_a_limit_fails_the_request_naming_the_setting_and_keeps_what_came_before(
        limits: Limits, setting: str) -> None:
    chunks = recorded("openai_refusal")[:5]
    poison = (b'{"choices":[{"index":0,"delta":{"content":"' + b"x" * 1_100 + b'"}}],"x":' + b"[" * 9
              + b"]" * 9 + b"}")
    stream = Stream()
    stream.state = RequestState("r1", "1-0", 100.0, limits)
    stream.start()
    stream.chunks(chunks)
    assert stream.chunk(poison, len(chunks))
    outcome = stream.state.outcome(2_000)
    assert (outcome.record["status"], outcome.record["error"]["type"]) == ("failed", "limit_exceeded")
    assert setting in outcome.record["error"]["message"]
    assert outcome.record["completion"]["choices"] == assemble(chunks[:5])["completion"]["choices"]


def test_limits_count_each_attempt_afresh() -> None:
    chunk = b'{"choices":[{"index":0,"delta":{"content":"' + b"x" * 400 + b'"}}]}'
    stream = Stream()
    stream.state = RequestState("r1", "1-0", 100.0, Limits(chunks=3, request_bytes=1_400))
    stream.start()
    stream.chunks([chunk] * 3)
    stream.chunks([chunk] * 3, attempt=1)  # a retry starts over: three more fit
    stream.end(attempt=1)
    assert stream.state.outcome(2_000).record["error"] is None


def test_a_dead_letter_keeps_at_most_64_kib_of_the_payload() -> None:
    stream = Stream()
    stream.start()
    assert stream.chunk(b"{" + b"x" * 100_000, 0)
    dead = stream.state.outcome(2_000).dead_letter
    assert dead is not None and len(dead.payload) == 65_536


def test_a_second_start_with_another_token_fails_the_request_as_reused() -> None:
    stream = Stream()
    stream.entry(encode_start({}, "auto", attempt=0, ts_ms=1, token="a"))
    stream.chunks(recorded("openai_refusal")[:2])
    stream.entry(encode_start({}, "auto", attempt=0, ts_ms=2, token="a"))  # its own re-run: fine
    assert not stream.state.ended
    assert stream.entry(encode_start({}, "auto", attempt=0, ts_ms=3, token="b"))
    outcome = stream.state.outcome(2_000)
    assert outcome.record["error"]["type"] == "request_id_reused"
    assert outcome.token == "a"
