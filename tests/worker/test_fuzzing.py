"""Property-based fuzzing of everything a worker decodes from what producers write.

Envelopes, start and error bodies, chunk payloads, SSE lines and control entries are generated from
anything at all to almost right: the worker's parts may reject them (``ContractError``, ``ChunkError``,
a dead letter) but never raise anything else, never hang, and a request's outcome always encodes. The
coverage-guided counterpart runs with ``make fuzz`` (fuzz/); inputs it found worth keeping are plain tests
in test_fuzz_regressions.py.
"""

from __future__ import annotations

import json

import fakeredis
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline_rig import Rig, recorded
from streamfold.capture import read_capture
from streamfold.contract import Envelope, decode_envelope, decode_error, decode_start
from streamfold.errors import ChunkError, ContractError
from worker import Assembler
from worker.limits import Limits
from worker.request import RequestState

FUZZ = settings(max_examples=150, deadline=None)

REAL_CHUNKS = [chunk for name in ("openai_parallel_tool_calls", "deepseek_reasoner_tool_call",
                                  "openai_n3_multiple_choices") for chunk in recorded(name)]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=30)
chunk_like = st.fixed_dictionaries({}, optional={
    "id": json_values, "model": json_values, "created": json_values, "usage": json_values, "error": json_values,
    "choices": st.lists(st.fixed_dictionaries({}, optional={
        "index": json_values, "finish_reason": json_values, "logprobs": json_values,
        "delta": st.fixed_dictionaries({}, optional={
            "content": json_values, "role": json_values, "refusal": json_values, "reasoning_content": json_values,
            "tool_calls": st.lists(st.fixed_dictionaries({}, optional={
                "index": json_values, "id": json_values, "type": json_values,
                "function": st.fixed_dictionaries({}, optional={"name": json_values, "arguments": json_values}),
            }), max_size=3)}),
    }), max_size=3)})
deep = st.integers(min_value=60, max_value=1_100).map(lambda depth: b'{"a":' * depth + b"1" + b"}" * depth)
payloads = st.one_of(
    st.sampled_from(REAL_CHUNKS),
    # The standard library writes integers of any size, as a producer may; orjson would refuse them.
    chunk_like.map(lambda value: json.dumps(value).encode()),
    json_values.map(lambda value: json.dumps(value).encode()),
    deep,
    st.binary(max_size=64),
    st.integers(min_value=1, max_value=40).map(lambda digits: b"1" * digits),
)
numbers = st.one_of(st.integers(min_value=0, max_value=5).map(lambda n: b"%d" % n),
                    st.sampled_from([b"-1", b"+1", b" 1", b"1_0", b"9" * 25, b"", b"x", b"\xff"]))
envelopes = st.one_of(
    st.fixed_dictionaries({b"k": st.sampled_from([b"start", b"chunk", b"end", b"error", b"other", b"\xff"]),
                           b"att": numbers, b"ts": numbers, b"seq": numbers, b"d": payloads}),
    st.dictionaries(st.sampled_from([b"k", b"att", b"ts", b"seq", b"d", b"x"]), st.binary(max_size=12), max_size=5),
)


@FUZZ
@given(fields=envelopes)
def test_decoding_an_entry_gives_an_envelope_or_a_contract_error(fields: dict[bytes, bytes]) -> None:
    try:
        envelope = decode_envelope(fields)
    except ContractError:
        return
    assert isinstance(envelope, Envelope) and 0 <= envelope.attempt < 2**63 and envelope.ts_ms < 2**63
    for decode in (decode_start, decode_error):
        try:
            orjson.dumps(decode(envelope))
        except ContractError:
            pass


@FUZZ
@given(entries=st.lists(envelopes, max_size=12), start=st.booleans())
def test_a_request_state_takes_any_entries_and_its_outcome_always_encodes(entries: list[dict[bytes, bytes]],
                                                                         start: bool) -> None:
    state = RequestState("fuzzed", "1-0", 0.0, Limits(json_depth=64))
    if start:
        state.feed("1-1", {b"k": b"start", b"att": b"0", b"ts": b"1", b"d": b'{"meta": {"t": 1}}'}, 0.0)
    for number, fields in enumerate(entries, start=2):
        state.feed(f"{number}-0", fields, 0.0)
    state.check_stall(100.0, 60.0)
    outcome = state.outcome(1_000)
    assert orjson.loads(outcome.encoded_record)["request_id"] == "fuzzed"
    assert orjson.loads(outcome.encoded_usage)["status"] in ("completed", "incomplete", "failed")
    if outcome.dead_letter is not None:
        assert outcome.record["status"] == "failed" and len(outcome.dead_letter.payload) <= 65_536


@FUZZ
@given(payload=payloads)
def test_a_rejected_chunk_leaves_the_assembler_as_it_was(payload: bytes) -> None:
    assembler = Assembler()
    for chunk in REAL_CHUNKS[:4]:
        assembler.feed(chunk)
    before = assembler.result()
    try:
        assembler.feed(payload)
    except ChunkError:
        assert assembler.result() == before


@FUZZ
@given(lines=st.lists(st.one_of(st.binary(max_size=30), st.sampled_from(
    [b"data: [DONE]", b"event: error", b"data: {}", b":", b"id: 1", b"", b"data:", b"retry: x",
     b"Chunk(id='x')", b"Choice(", b"delta=[{'a': None}],", b")"])), max_size=12))
def test_any_capture_reads_as_items_and_any_sse_line_as_a_chunk_or_a_chunk_error(lines: list[bytes]) -> None:
    try:
        for item in read_capture(line + b"\n" for line in lines):
            assert item.kind in ("chunk", "error", "done")
            if item.kind == "error":
                item.error_body()
    except ChunkError:  # a printed capture stops at the first object it cannot read
        pass
    assembler = Assembler()
    for line in lines:
        try:
            assembler.feed(line)
        except ChunkError:
            pass
    orjson.dumps(assembler.result())


@FUZZ
@given(request_ids=st.lists(st.one_of(st.binary(max_size=12), st.text(max_size=12).map(str.encode)),
                            min_size=1, max_size=6))
def test_every_control_entry_is_claimed_or_dead_lettered(request_ids: list[bytes]) -> None:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    rig = Rig(client, "fuzz")
    for request_id in request_ids:
        client.xadd(rig.keys.requests(0), {b"rid": request_id, b"ts": b"1"} if request_id else {b"ts": b"1"})
    claims = rig.broker().claim(len(request_ids))
    dead = rig.dead_letters()
    assert len(claims) + len(dead) == len(request_ids)
    assert {entry["message_id"].decode() for entry in rig.pending()} == {claim.entry_id for claim in claims}
    assert all(fields[b"reason"] for fields in dead)
    client.close()
