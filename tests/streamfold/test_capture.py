"""The SSE decoder reads a body as the SSE spec does, in pieces of any size, and a capture as the worker's
``assemble`` and the producer's ``replay`` read it."""

from __future__ import annotations

import pytest

from streamfold.capture import CapturedItem, SSEDecoder, read_capture

BODY = (b": keep-alive\r\n\r\n"
        b"data: {\"a\": 1}\n\n"
        b"event: error\r\ndata: {\"error\":\r\ndata:  \"x\"}\r\n\r\n"
        b"id: 7\nretry: 100\ndata\n\n"
        b"data: [DONE]\r\r")
EVENTS = [CapturedItem("chunk", b'{"a": 1}'), CapturedItem("error", b'{"error":\n "x"}'), CapturedItem("chunk", b""),
          CapturedItem("done")]


def decode(pieces: list[bytes]) -> list[CapturedItem]:
    decoder = SSEDecoder()
    return [item for piece in pieces for item in decoder.feed(piece)]


def test_cr_lf_and_crlf_end_lines_and_multi_line_data_joins_with_newlines() -> None:
    assert decode([BODY]) == EVENTS


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13])
def test_a_body_cut_into_pieces_of_any_size_decodes_the_same(size: int) -> None:
    assert decode([BODY[at:at + size] for at in range(0, len(BODY), size)]) == EVENTS


def test_a_crlf_split_between_two_pieces_ends_one_line() -> None:
    assert decode([b"data: x\r", b"\ndata: y\r", b"\n\r", b"\n"]) == [CapturedItem("chunk", b"x\ny")]


def test_an_event_is_dispatched_as_soon_as_its_blank_line_arrives() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\n") == []
    assert decoder.feed(b"\n") == [CapturedItem("chunk", b"x")]


def test_lines_that_are_no_field_are_ignored_and_a_leading_bom_is_dropped() -> None:
    assert decode([b"\xef\xbb\xbfdata: a\n\nnonsense\nevent: ping\n\n{\"b\": 2}\ndata: c\n\n"]) == [
        CapturedItem("chunk", b"a"), CapturedItem("chunk", b"c")]


def test_an_event_without_its_blank_line_is_dispatched_only_by_flush() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\ndata: b") == [CapturedItem("chunk", b"a")]
    assert decoder.flush() == [CapturedItem("chunk", b"b")]


def test_the_meaning_of_an_event_is_the_callers() -> None:
    decoder = SSEDecoder(lambda event, data: CapturedItem("error" if event == b"oops" else "chunk", data))
    assert decoder.feed(b"event: oops\ndata: x\n\n") == [CapturedItem("error", b"x")]


def test_a_capture_passes_lines_that_are_no_field_on_as_chunks_and_ends_its_last_event() -> None:
    lines = [b"\n", b"event: message\n", b"data: {\"a\": 1}\n", b"\n", b"garbage\n", b"data: [DONE]\n", b"\n",
             b"data: {\"b\": 2}"]
    assert list(read_capture(lines)) == [CapturedItem("chunk", b'{"a": 1}'), CapturedItem("chunk", b"garbage"),
                                         CapturedItem("done"), CapturedItem("chunk", b'{"b": 2}')]


def test_a_json_lines_capture_is_one_chunk_per_line() -> None:
    assert list(read_capture([b'{"a": 1}\n', b"\n", b' {"b": 2}\n'])) == [CapturedItem("chunk", b'{"a": 1}'),
                                                                         CapturedItem("chunk", b'{"b": 2}')]
