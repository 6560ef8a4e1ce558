"""Inputs found by fuzzing (or written while fuzzing) that once broke, or nearly broke, a decode path.

Each is a plain example, kept so that the case it names can never come back unnoticed.
"""

from __future__ import annotations

import orjson
import pytest

from streamfold.contract import decode_envelope, decode_request_id
from streamfold.errors import ChunkError, ContractError
from worker import Assembler
from worker.request import RequestState


@pytest.mark.parametrize("number", [b"9223372036854775808", b"\xd9\xa3", b"1" * 20, b"-0", b"0x10", b"1e3",
                                    b" 1", b"1\n"])
def test_envelope_numbers_outside_the_contract_are_rejected(number: bytes) -> None:
    with pytest.raises(ContractError):
        decode_envelope({b"k": b"chunk", b"att": b"0", b"ts": number, b"seq": b"0", b"d": b"{}"})


def test_the_largest_64_bit_timestamp_is_still_an_envelope() -> None:
    envelope = decode_envelope({b"k": b"end", b"att": b"0", b"ts": b"9223372036854775807"})
    assert envelope.ts_ms == 2**63 - 1


@pytest.mark.parametrize("raw", [b"\x00", b"a\x7fb", "rid\u2028".encode(), "\u200brid".encode(), b"\xed\xa0\x80"])
def test_request_ids_with_control_or_invisible_characters_are_rejected(raw: bytes) -> None:
    with pytest.raises(ContractError, match="request id"):
        decode_request_id(raw)


def test_a_lone_surrogate_escape_in_a_chunk_is_a_chunk_error() -> None:
    with pytest.raises(ChunkError, match="not JSON"):
        Assembler().feed(b'{"choices":[{"index":0,"delta":{"content":"\\ud800"}}]}')


def test_an_integer_beyond_64_bits_in_usage_is_read_as_a_number_that_encodes_again() -> None:
    state = RequestState("big", "1-0", 0.0)
    state.feed("2-0", {b"k": b"start", b"att": b"0", b"ts": b"1", b"d": b"{}"}, 0.0)
    usage = b'{"choices":[],"usage":{"prompt_tokens":123456789012345678901234567890}}'
    state.feed("3-0", {b"k": b"chunk", b"att": b"0", b"ts": b"1", b"seq": b"0", b"d": usage}, 0.0)
    outcome = state.outcome(1)
    assert orjson.loads(outcome.encoded_record)["completion"]["usage"]["prompt_tokens"] > 1e29
    assert outcome.usage["prompt_tokens"] is None  # not an integer count any more: unknown, never a guess


def test_an_error_envelope_whose_fields_nest_deep_fails_with_a_bounded_message() -> None:
    state = RequestState("deep-error", "1-0", 0.0)
    body = b'{"message":' + b"[" * 40 + b"]" * 40 + b',"code":{"a":[1,2]},"status":99999999999999999999}'
    state.feed("2-0", {b"k": b"error", b"att": b"0", b"ts": b"1", b"d": body}, 0.0)
    error = orjson.loads(state.outcome(1).encoded_record)["error"]
    assert error["status"] is None and error["code"] == "{'a': [1, 2]}"
    assert len(error["message"]) <= 200
