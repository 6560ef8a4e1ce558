"""The SSE decoder reads a body as the SSE spec does, in pieces of any size, and a capture as the worker's
``assemble`` and the producer's ``replay`` read it."""

from __future__ import annotations

import pytest

from streamfold.capture import CapturedItem, SSEDecoder, read_capture
from streamfold.errors import ChunkError

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


def test_every_item_of_a_capture_carries_the_line_it_starts_on() -> None:
    json_lines = [b"\n", b'{"a": 1}\n', b"\n", b'{"b": 2}\n']
    sse = [b": hi\n", b"data: {\"a\":\n", b"data: 1}\n", b"\n", b"garbage\n", b"event: error\n", b"data: x\n", b"\n",
           b"data: {\"b\": 2}"]
    assert [item.line for item in read_capture(json_lines)] == [2, 4]
    assert [(item.kind, item.line) for item in read_capture(sse)] == [("chunk", 2), ("chunk", 5), ("error", 7),
                                                                      ("chunk", 9)]


def test_a_capture_of_printed_sdk_objects_reads_as_their_json_chunks_one_or_many_lines_each() -> None:
    lines = [b"\n", b"ChatCompletionChunk(id='a', choices=[], usage=None)\n", b"\n", b"ChatCompletionChunk(\n",
             b"id=\"a\",\n", b"choices=[Choice(delta=ChoiceDelta(content=')'), index=0)],\n", b")\n"]
    assert [(item.data, item.line) for item in read_capture(lines)] == [
        (b'{"id":"a","choices":[],"usage":null}', 2), (b'{"id":"a","choices":[{"delta":{"content":")"},"index":0}]}', 4)]


@pytest.mark.parametrize(("lines", "error"), [
    ([b"Chunk(id='a')\n", b"Chunk(id=os.environ)\n"], "line 2: the attribute access os.environ is not allowed"),
    ([b"Chunk(id='a')\n", b"...\n"], "line 2: not a printed chunk: expected Name(field=...), found Constant ..."),
    ([b"Chunk(id='a')\n", b"Chunk(\n", b"id='b',\n"], "line 2: a printed chunk starts here and never ends"),
    ([b"Chunk(\n", b"a=" + b"[" * 200 + b"\n"], "line 1: a printed chunk nested deeper than 100 levels"),
])
def test_a_printed_capture_that_cannot_be_read_is_a_chunk_error_naming_the_line(lines: list[bytes], error: str) -> None:
    with pytest.raises(ChunkError) as refused:
        list(read_capture(lines))
    assert str(refused.value).startswith(error)
