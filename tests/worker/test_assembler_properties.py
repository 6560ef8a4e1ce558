"""Properties of assembly that must hold for any text and any way a provider cuts it into chunks.

Auto mode is ambiguous by design: an incremental stream whose pieces happen to form a growing prefix chain
ending in a repeat reads exactly like a cumulative one. ``meets_cumulative_rule`` states the documented rule
so each property says precisely when auto mode may differ from incremental mode.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from worker import assemble

FAST = settings(max_examples=200, deadline=None)
TEXT_FIELDS = ["content", "refusal", "reasoning_content", "reasoning"]

texts = st.one_of(st.text(alphabet="ab", max_size=12), st.text(max_size=40))
json_arguments = st.dictionaries(
    st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=8), st.booleans()), max_size=4
).map(json.dumps)


def meets_cumulative_rule(values: list[str]) -> bool:
    """docs/assembly.md: at least three non-empty values, each starting with the one before it, at least two of
    them longer than the one before, and the last value sent at least twice."""
    sent = [value for value in values if value]
    if len(sent) < 3:
        return False
    pairs = list(zip(sent, sent[1:]))
    if not all(later.startswith(earlier) for earlier, later in pairs):
        return False
    if sum(len(later) > len(earlier) for earlier, later in pairs) < 2:
        return False
    return sent.count(sent[-1]) >= 2


def split(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(min(cut, len(text)) for cut in cuts), len(text)]
    return [text[start:end] for start, end in zip(bounds, bounds[1:])]


def _chunk(*choices: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "chatcmpl-prop",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "prop-model",
        "choices": list(choices),
    }


def _choice(index: int = 0, finish_reason: str | None = None, **delta: Any) -> dict[str, Any]:
    return {"index": index, "delta": delta, "finish_reason": finish_reason}


def answer_stream(content: list[str], reasoning: list[str], arguments: list[str]) -> list[dict[str, Any]]:
    """Reasoning, then content, then one tool call whose arguments arrive in pieces, then the finish chunk."""
    first, *rest = arguments
    chunks = [_chunk(_choice(role="assistant"))]
    chunks += [_chunk(_choice(reasoning_content=piece)) for piece in reasoning]
    chunks += [_chunk(_choice(content=piece)) for piece in content]
    opening = {"index": 0, "id": "call_prop", "type": "function", "function": {"name": "f", "arguments": first}}
    chunks.append(_chunk(_choice(tool_calls=[opening])))
    chunks += [_chunk(_choice(tool_calls=[{"index": 0, "function": {"arguments": piece}}])) for piece in rest]
    chunks.append(_chunk(_choice(finish_reason="tool_calls")))
    return chunks


cuts = st.lists(st.integers(min_value=0, max_value=60), max_size=8)


def prefixes(text: str, lengths: list[int]) -> list[str]:
    return [text[:length] for length in sorted(lengths)]


# Any text cut at any points, and, because random cuts almost never form the growing prefix chain the
# cumulative rule looks for, also chunks that each repeat a prefix of one text (their join is the content).
pieces = st.one_of(
    st.builds(split, texts, cuts),
    st.builds(prefixes, texts, st.lists(st.integers(min_value=0, max_value=12), min_size=1, max_size=6)),
)
argument_pieces = st.builds(split, json_arguments, cuts)


@FAST
@given(content=pieces, reasoning=pieces, arguments=argument_pieces)
def test_incremental_mode_gives_the_same_result_however_the_text_is_split(
    content: list[str], reasoning: list[str], arguments: list[str]
) -> None:
    content_text, reasoning_text, arguments_text = "".join(content), "".join(reasoning), "".join(arguments)
    record = assemble(answer_stream(content, reasoning, arguments), mode="incremental")
    assert record["status"] == "completed"
    assert record["warnings"] == []
    message = record["completion"]["choices"][0]["message"]
    assert message["content"] == content_text
    assert message["reasoning_content"] == reasoning_text
    assert message["tool_calls"] == [
        {"id": "call_prop", "type": "function", "function": {"name": "f", "arguments": arguments_text}}
    ]
    whole = answer_stream([content_text], [reasoning_text], [arguments_text])
    assert record["completion"] == assemble(whole, mode="incremental")["completion"]


@FAST
@given(content=pieces, reasoning=pieces, arguments=argument_pieces)
def test_auto_mode_matches_incremental_unless_the_split_meets_the_cumulative_rule(
    content: list[str], reasoning: list[str], arguments: list[str]
) -> None:
    record = assemble(answer_stream(content, reasoning, arguments), mode="auto")
    message = record["completion"]["choices"][0]["message"]
    for field, field_pieces in [("content", content), ("reasoning_content", reasoning)]:
        if meets_cumulative_rule(field_pieces):
            assert message[field] == [piece for piece in field_pieces if piece][-1]
        else:
            assert message[field] == "".join(field_pieces)
    assert message["tool_calls"][0]["function"]["arguments"] == "".join(arguments)
    assert record["status"] == "completed"


@FAST
@given(text=texts.filter(bool), text_cuts=cuts, field=st.sampled_from(TEXT_FIELDS))
def test_cumulative_rendering_of_any_text_gives_the_text_back(text: str, text_cuts: list[int], field: str) -> None:
    parts = split(text, text_cuts)
    so_far = ["".join(parts[: count + 1]) for count in range(len(parts))]
    rendering = [*so_far, text]
    chunks = [_chunk(_choice(role="assistant"))]
    chunks += [_chunk({"index": 0, "delta": {field: value}}) for value in rendering[:-1]]
    chunks.append(_chunk({"index": 0, "delta": {field: rendering[-1]}, "finish_reason": "stop"}))

    cumulative = assemble(chunks, mode="cumulative")
    assert cumulative["status"] == "completed"
    assert cumulative["warnings"] == []
    assert cumulative["completion"]["choices"][0]["message"][field] == text

    auto = assemble(chunks, mode="auto")["completion"]["choices"][0]["message"][field]
    assert auto == (text if meets_cumulative_rule(rendering) else "".join(rendering))


FINISH_REASONS = ["stop", "length", "tool_calls", "content_filter"]


@st.composite
def interleaved_choices(draw: st.DrawFn) -> tuple[dict[int, tuple[str, str]], list[dict[str, Any]]]:
    """Several choices, each with its own text and finish reason, their chunks interleaved in any order and
    sometimes several choices in one chunk."""
    indexes = draw(st.lists(st.integers(min_value=0, max_value=6), min_size=1, max_size=4, unique=True))
    expected: dict[int, tuple[str, str]] = {}
    queues: dict[int, list[dict[str, Any]]] = {}
    for index in indexes:
        text = draw(texts)
        reason = draw(st.sampled_from(FINISH_REASONS))
        expected[index] = (text, reason)
        queue = [_choice(index, role="assistant")]
        queue += [_choice(index, content=piece) for piece in split(text, draw(cuts))]
        queue.append(_choice(index, finish_reason=reason))
        queues[index] = queue

    order = draw(st.permutations([index for index in indexes for _ in queues[index]]))
    chunks: list[dict[str, Any]] = []
    group: list[dict[str, Any]] = []
    for index in order:
        choice = queues[index].pop(0)
        joins = draw(st.booleans())
        if group and (not joins or any(member["index"] == index for member in group)):
            chunks.append(_chunk(*group))
            group = []
        group.append(choice)
    chunks.append(_chunk(*group))
    return expected, chunks


@FAST
@given(case=interleaved_choices())
def test_interleaved_choices_each_get_their_own_text_and_finish_reason(
    case: tuple[dict[int, tuple[str, str]], list[dict[str, Any]]],
) -> None:
    expected, chunks = case
    record = assemble(chunks, mode="incremental")
    assert record["status"] == "completed"
    choices = record["completion"]["choices"]
    assert [choice["index"] for choice in choices] == sorted(expected)
    for choice in choices:
        text, reason = expected[choice["index"]]
        assert choice["message"]["content"] == text
        assert choice["message"]["role"] == "assistant"
        assert choice["finish_reason"] == reason
