"""Native streams through the whole pipeline: a producer names the format in its start (or leaves it to the
worker), a worker assembles each request from Redis, and publishes its record and normalized usage event."""

from __future__ import annotations

import pytest
import redis

from native_streams import fixture_names, native_lines
from pipeline_rig import Rig, client  # noqa: F401  (``client`` is a fixture)
from worker import assemble


@pytest.fixture
def rig(client: redis.Redis, namespace: str) -> Rig:  # noqa: F811
    return Rig(client, namespace)


def test_every_native_stream_is_assembled_by_a_worker_as_assemble_does(rig: Rig) -> None:
    requests = {}
    for dialect in ("anthropic", "responses", "gemini"):
        for number, name in enumerate(fixture_names(dialect)):
            request_id = f"{dialect}-{number}"
            requests[request_id] = (dialect, name)
            # half of the producers name the format, the others leave it to the worker to recognise
            rig.publish(request_id, native_lines(dialect, name), format=dialect if number % 2 else None,
                        meta={"source": name})
    assert rig.worker(concurrency=8).run() == 0
    for record in rig.results():
        dialect, name = requests[record["request_id"]]
        expected = assemble(native_lines(dialect, name))
        assert (record["format"], record["status"]) == (dialect, "completed")
        assert record["completion"] == expected["completion"]
        assert record["native"] == expected["native"]
    usage = {event["request_id"]: event for event in rig.usage()}
    assert sorted(usage) == sorted(requests)
    for request_id, event in usage.items():
        dialect, name = requests[request_id]
        assert event["format"] == dialect
        assert isinstance(event["prompt_tokens"], int) and isinstance(event["completion_tokens"], int)
        assert event["usage"] is not None
    assert rig.pending() == []
