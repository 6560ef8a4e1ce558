"""``python -m worker assemble``: one record per file on stdout, one line per problem on stderr."""

from __future__ import annotations

from pathlib import Path

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
