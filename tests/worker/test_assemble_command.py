"""``python -m worker assemble``: one record per file on stdout, one line per problem on stderr."""

from __future__ import annotations

from itertools import zip_longest
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline_rig import RECORDED, recorded
from worker import assemble
from worker.cli import main


def test_each_file_gives_one_record_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = [RECORDED / "openai_refusal.jsonl", RECORDED / "groq_tool_call_whole_args.jsonl"]
    assert main(["assemble", *map(str, files)]) == 0
    records = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [record["completion"] for record in records] == [assemble(recorded(path.stem))["completion"]
                                                            for path in files]


def test_a_result_too_deep_to_write_is_one_error_line_and_exit_1(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    deep = tmp_path / "deep.jsonl"
    deep.write_bytes(b'{"choices":[],"usage":' + b'{"x":' * 300 + b"1" + b"}" * 300 + b"}\n")
    assert main(["assemble", str(deep), str(RECORDED / "openai_refusal.jsonl")]) == 1
    out, err = capsys.readouterr()
    assert err.strip() == f"{deep}: the result cannot be written as JSON: Recursion limit reached"
    assert len(out.splitlines()) == 1  # the other file is still assembled


SEEDS = RECORDED.parent / "seeds"


def interleave(*streams: list[bytes]) -> list[bytes]:
    """The chunks of several streams taken in turn, one of each: A, B, A, B, ..."""
    return [chunk for turn in zip_longest(*streams) for chunk in turn if chunk is not None]


def run(capsys: pytest.CaptureFixture[str], *arguments: str) -> tuple[int, list[dict[str, Any]], str]:
    status = main(["assemble", *arguments])
    out, err = capsys.readouterr()
    return status, [orjson.loads(line) for line in out.splitlines()], err


@pytest.mark.parametrize("name", ["doubao_tool_call_whole", "doubao_tool_call_fragments"])
def test_the_doubao_seeds_printed_by_the_sdk_assemble_as_their_json_chunks_do(
        name: str, capsys: pytest.CaptureFixture[str]) -> None:
    printed, json_lines = SEEDS / f"{name}.printed.txt", SEEDS / f"{name}.jsonl"
    status, records, err = run(capsys, str(printed), str(json_lines))
    assert (status, err) == (0, "")
    assert records[0]["request_id"] == str(printed) and records[0]["status"] == "completed"
    assert {**records[0], "request_id": "", "meta": {}} == {**records[1], "request_id": "", "meta": {}}
    assert records[0]["completion"]["choices"][0]["message"]["tool_calls"][0]["function"] == {
        "name": "AppFinder", "arguments": '{"prompt": "有道词典", "region": "CN"}'}


def test_every_seed_file_is_one_stream_and_one_record(capsys: pytest.CaptureFixture[str]) -> None:
    files = sorted(map(str, SEEDS.glob("*.jsonl"))) + sorted(map(str, SEEDS.glob("*.printed.txt")))
    status, records, _ = run(capsys, *files)
    assert status == 0 and [record["request_id"] for record in records] == files
    assert {record["status"] for record in records} == {"completed"}


@pytest.mark.parametrize("name", ["openai_n3_multiple_choices", "openai_content_logprobs", "deepseek_reasoner_tool_call",
                                  "xai_grok_reasoning_tool_call", "openai_parallel_tool_calls"])
def test_a_stream_printed_by_the_openai_sdk_on_one_line_per_chunk_assembles_the_same_choices(
        name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    chunk_type = pytest.importorskip("openai.types.chat").ChatCompletionChunk
    printed = tmp_path / "printed.log"
    printed.write_text("".join(f"{chunk_type.model_validate_json(chunk)!r}\n" for chunk in recorded(name)))
    status, [record], _ = run(capsys, str(printed))
    expected = assemble(recorded(name))
    assert status == 0 and record["status"] == expected["status"]
    assert record["completion"]["choices"] == expected["completion"]["choices"]


def test_interleaved_streams_give_one_record_each_in_first_seen_order(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, second = recorded("openai_refusal"), recorded("deepseek_reasoner_tool_call")
    both = tmp_path / "both.jsonl"
    both.write_bytes(b"\n".join(interleave(first, second)) + b"\n")
    status, records, err = run(capsys, str(both))
    assert (status, err) == (0, "")
    assert [record["completion"] for record in records] == [assemble(first)["completion"],
                                                            assemble(second)["completion"]]
    assert [record["request_id"] for record in records] == [f"{both}#1", f"{both}#2"]
    assert [record["meta"] for record in records] == [
        {"source": str(both), "chunk_id": orjson.loads(first[0])["id"], "line": 1},
        {"source": str(both), "chunk_id": orjson.loads(second[0])["id"], "line": 2}]
    assert all(record["status"] == "completed" and record["warnings"] == [] for record in records)


def test_printed_streams_interleaved_split_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    chunk_type = pytest.importorskip("openai.types.chat").ChatCompletionChunk
    names = ("openai_refusal", "groq_tool_call_whole_args")
    printed = tmp_path / "printed.log"
    printed.write_text("".join(f"{chunk_type.model_validate_json(chunk)!r}\n"
                               for chunk in interleave(*map(recorded, names))))
    status, records, _ = run(capsys, str(printed))
    assert status == 0
    assert [record["completion"]["choices"] for record in records] == [
        assemble(recorded(name))["completion"]["choices"] for name in names]


def test_a_chunk_without_an_id_stays_with_the_stream_before_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def chunk(id: str | None, text: str, finish: str | None = None) -> bytes:
        fields = {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}
        return orjson.dumps(fields if id is None else {"id": id, **fields})
    lines = [chunk(None, "a1 "), chunk("a", "a2 "), chunk("b", "b1 "), chunk(None, "b2 "), chunk("", "b3", "stop"),
             chunk("a", "a3"), chunk(None, "", "stop")]
    capture = tmp_path / "mixed.jsonl"
    capture.write_bytes(b"\n".join(lines))
    status, records, _ = run(capsys, str(capture))
    assert status == 0
    assert [record["completion"]["choices"][0]["message"]["content"] for record in records] == ["a1 a2 a3",
                                                                                                  "b1 b2 b3"]
    assert [record["status"] for record in records] == ["completed", "completed"]


def test_single_refuses_a_second_stream_naming_the_line_where_the_id_changed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, second = recorded("openai_refusal"), recorded("groq_tool_call_whole_args")
    both = tmp_path / "both.jsonl"
    both.write_bytes(b"\n".join([*first[:3], b"", *interleave(first[3:], second)]) + b"\n")
    status, records, err = run(capsys, "--single", str(both))
    assert (status, records) == (1, [])
    assert err == (f"{both}: line 6: the chunk id changes from {orjson.loads(first[0])['id']!r} to "
                   f"{orjson.loads(second[0])['id']!r}: the capture holds more than one stream "
                   "(without --single each gets a record)\n")
    alone = RECORDED / "openai_refusal.jsonl"
    assert run(capsys, "--single", str(alone)) == run(capsys, str(alone))


@pytest.mark.parametrize(("text", "error"), [
    ("__import__('os').system('touch owned')\n", "line 1: a call of __import__('os').system is not allowed"),
    ("ChatCompletionChunk(id='a', choices=[])\nChatCompletionChunk(id=os.environ, choices=[])\n",
     "line 2: the attribute access os.environ is not allowed"),
    ("ChatCompletionChunk(\nid='a',\nchoices=" + "[" * 5000 + "]" * 5000 + ")\n",
     "line 1: a printed chunk nested deeper than 100 levels"),
    ("ChatCompletionChunk(id='a', usage=" + "-" * 100_000 + "1)\n", "line 1: not a printed chunk: "),
])
def test_a_printed_capture_that_is_not_made_of_chunks_is_refused_naming_the_line_and_nothing_runs(
        text: str, error: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    hostile = tmp_path / "hostile.log"
    hostile.write_text(text)
    status, records, err = run(capsys, str(hostile))
    assert (status, records) == (1, [])
    assert err.startswith(f"{hostile}: {error}") and len(err.splitlines()) == 1
    assert not (tmp_path / "owned").exists()


def test_a_chunk_that_cannot_be_assembled_is_named_by_its_line_and_stream(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, second = recorded("openai_refusal"), recorded("groq_tool_call_whole_args")
    bad = orjson.dumps({"id": orjson.loads(second[0])["id"], "choices": "not a list"})
    capture = tmp_path / "bad.jsonl"
    capture.write_bytes(b"\n".join([first[0], second[0], first[1], bad]))
    status, _, err = run(capsys, str(capture))
    assert status == 1
    assert err.startswith(f"{capture}: line 4: chunk 1: ")
    assert err.rstrip().endswith(f"(stream {orjson.loads(second[0])['id']})")
