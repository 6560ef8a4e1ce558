"""Structured logs: the same event as a readable line and as one JSON object."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import orjson
import pytest

from streamfold.errors import ConfigError
from streamfold.logs import EventLog, formatter

Output = tuple[logging.Logger, io.StringIO, "logging.StreamHandler[io.StringIO]"]


@pytest.fixture
def output() -> Iterator[Output]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("streamfold.test-logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream, handler
    logger.removeHandler(handler)


def test_an_event_in_json_is_one_object_with_ts_level_event_request_id_worker_and_its_fields(output: Output) -> None:
    logger, stream, handler = output
    handler.setFormatter(formatter("json"))
    EventLog(logger, worker="w1").info("request_finished", request_id="r1", status="completed", chunks=12)
    logger.warning("a plain record from %s", "a library")
    first, second = (orjson.loads(line) for line in stream.getvalue().splitlines())
    assert first["ts"].endswith("Z") and first["level"] == "info"
    assert {key: first[key] for key in ("event", "request_id", "worker", "status", "chunks")} == {
        "event": "request_finished", "request_id": "r1", "worker": "w1", "status": "completed", "chunks": 12}
    assert (second["event"], second["request_id"], second["worker"]) == ("a plain record from a library", None, None)


def test_an_event_in_text_is_one_line_with_its_fields_as_name_value_pairs(output: Output) -> None:
    logger, stream, handler = output
    handler.setFormatter(formatter("text"))
    EventLog(logger, worker="w1").warning("entry_dead_lettered", request_id="r1", reason="seq 4: not JSON", ok=True)
    (line,) = stream.getvalue().splitlines()
    assert line.endswith(' WARNING streamfold.test-logs: entry_dead_lettered request_id=r1 reason="seq 4: not JSON" '
                         'ok=true worker=w1')


def test_an_exception_is_kept_on_the_same_json_line(output: Output) -> None:
    logger, stream, handler = output
    handler.setFormatter(formatter("json"))
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    (line,) = stream.getvalue().splitlines()
    assert "ValueError: boom" in orjson.loads(line)["exc"]


def test_an_unknown_log_format_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown log format 'xml'"):
        formatter("xml")
