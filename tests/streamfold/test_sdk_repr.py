"""A printed SDK object reads as the dict of its fields; anything that is not one is refused, never run."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamfold.errors import ChunkError
from streamfold.sdk_repr import MAX_DEPTH, PrintedLines, looks_printed, parse_printed


def test_every_call_becomes_the_dict_of_its_keyword_arguments() -> None:
    text = ("ChatCompletionChunk(id='c1', choices=[Choice(delta=ChoiceDelta(content='it\\'s \"q\"\\n\\u00e9', "
            "tool_calls=[ChoiceDeltaToolCall(index=0, function=ChoiceDeltaToolCallFunction(arguments='{}', "
            "name='f'))]), finish_reason=None, index=0, logprobs=ChoiceLogprobs(content=[ChatCompletionTokenLogprob("
            "token='a', bytes=[97], logprob=-0.5, top_logprobs=[])]))], usage=CompletionUsage(completion_tokens=2, "
            "completion_tokens_details=CompletionTokensDetails(reasoning_tokens=0), extra={'k': [True, False, 1.5e3]}))")
    assert parse_printed(text) == {
        "id": "c1",
        "choices": [{"delta": {"content": "it's \"q\"\né", "tool_calls": [
            {"index": 0, "function": {"arguments": "{}", "name": "f"}}]},
            "finish_reason": None, "index": 0, "logprobs": {"content": [
                {"token": "a", "bytes": [97], "logprob": -0.5, "top_logprobs": []}]}}],
        "usage": {"completion_tokens": 2, "completion_tokens_details": {"reasoning_tokens": 0},
                  "extra": {"k": [True, False, 1500.0]}}}


@pytest.mark.parametrize(("text", "found"), [
    ("__import__('os').system('x')", "a call of __import__('os').system"),
    ("Chunk(id=__import__('os').system('x'))", "a call of __import__('os').system"),
    ("Chunk(id=os.environ)", "the attribute access os.environ"),
    ("Chunk(id=open('/etc/passwd'))", "a call of open"),
    ("Chunk(id=secret)", "the name secret"),
    ("Chunk('positional')", "Chunk(...) may only have field=value arguments"),
    ("Chunk(**fields)", "Chunk(...) may only have field=value arguments"),
    ("Chunk(id=1 + 1)", "BinOp 1 + 1"),
    ("Chunk(id=(1, 2))", "Tuple (1, 2)"),
    ("Chunk(id=[x for x in y])", "ListComp"),
    ("Chunk(id=lambda: 0)", "Lambda"),
    ("Chunk(id=b'bytes')", "the literal b'bytes'"),
    ("Chunk(id=1e999)", "the literal inf"),
    ("Chunk(id=2**70)", "BinOp"),
    ("Chunk(id=99999999999999999999999)", "the literal 99999999999999999999999"),
    ("Chunk(id={1: 'a'})", "a dict key must be a string"),
    ("Chunk(id=...)", "the literal Ellipsis"),
    ("{'id': 'x'}", "expected Name(field=...)"),
    ("Chunk(id='x'", "not a printed chunk"),
    ("Chunk(id=-'x')", "UnaryOp"),
])
def test_anything_but_fields_literals_lists_and_dicts_is_refused_with_what_was_found(text: str, found: str) -> None:
    with pytest.raises(ChunkError) as refused:
        parse_printed(text)
    assert found in str(refused.value)


def test_a_refused_call_is_never_run(tmp_path: Path) -> None:
    target = tmp_path / "written"
    for text in (f"Chunk(id=open({str(target)!r}, 'w'))", f"__import__('pathlib').Path({str(target)!r}).touch()"):
        with pytest.raises(ChunkError):
            parse_printed(text)
    assert not target.exists()


@pytest.mark.parametrize("text", [
    "Chunk(a=" * 150 + "1" + ")" * 150,
    "Chunk(a=" + "[" * 5000 + "]" * 5000 + ")",
    "Chunk(a=" + "-" * 100_000 + "1)",
    "Chunk(a=" + "x." * 100_000 + "y)",
    "Chunk(a=" + "1+" * 100_000 + "1)",
])
def test_deeply_nested_input_is_a_chunk_error_not_a_crash(text: str) -> None:
    with pytest.raises(ChunkError):
        parse_printed(text)


def test_printed_lines_gather_an_object_until_its_brackets_close_ignoring_brackets_in_strings() -> None:
    gathered = PrintedLines()
    assert gathered.feed("\n") is None and not gathered.open
    assert gathered.feed("Chunk(\n") is None and gathered.open
    assert gathered.feed("content=')(]', name=\"[\\\"\",\n") is None
    assert gathered.feed(")\n") == "Chunk(\ncontent=')(]', name=\"[\\\"\",\n)\n"
    assert not gathered.open
    assert gathered.feed("Chunk(id='one line')\n") == "Chunk(id='one line')\n"


def test_printed_lines_refuse_nesting_deeper_than_the_limit_at_once() -> None:
    gathered = PrintedLines()
    gathered.feed("(" * MAX_DEPTH + "\n")
    with pytest.raises(ChunkError, match=f"deeper than {MAX_DEPTH}"):
        gathered.feed("(")


def test_a_printed_first_line_is_told_from_json_and_sse() -> None:
    assert looks_printed(b"ChatCompletionChunk(\n") and looks_printed(b"  Chunk (id='x')")
    assert not any(map(looks_printed, [b'{"id": 1}', b"data: {}", b"event: error", b": comment"]))
