"""Following a request on a real Redis: live, after it finished, after its chunks expired, resumed, and from a
producer that died - always ending with the worker's record, never hanging."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator


import orjson
import pytest
import redis

from producer.follow import afollow, follow
from streamfold.errors import ResultTimeout
from streamfold.settings import Settings
from tests.conftest import RECORDED, ROOT, load_jsonl
from worker.live import Final, LiveEvent, TextDelta, ToolCallDone
from worker.runner import Worker
from worker.broker import Broker

pytestmark = pytest.mark.redis

CHUNKS = load_jsonl(RECORDED / "deepseek_reasoner_tool_call.jsonl")
ANSWER = load_jsonl(RECORDED / "alibaba_qwen3max_reasoning.jsonl")  # reasoning, then 816 characters of content


@pytest.fixture
def settings(real_redis_url: str, namespace: str) -> Settings:
    return Settings(redis_url=real_redis_url, namespace=namespace, block_ms=50, socket_timeout=2, stall_timeout=3,
                    claim_timeout=5)


@pytest.fixture
def worker(real_redis: redis.Redis, settings: Settings) -> Iterator[Worker]:
    """A stream worker serving in a thread for the length of the test."""
    serving = Worker(Broker.from_settings(real_redis, settings, "w1"), settings)
    thread = threading.Thread(target=serving.run, daemon=True)
    thread.start()
    yield serving
    serving.stop()
    serving.stop()
    thread.join(10)


def publish(client: redis.Redis, settings: Settings, request_id: str, chunks: list[bytes], *, pause: float = 0.0,
            end: bool = True) -> None:
    from producer.publisher import Publisher
    publisher = Publisher(client, settings.keys, batch_size=1)
    publisher.start(request_id)
    for chunk in chunks:
        publisher.push(request_id, chunk)
        time.sleep(pause)
    if end:
        publisher.end(request_id)


def content(events: list[LiveEvent], field: str = "content") -> str:
    return "".join(event.text for event in events if isinstance(event, TextDelta) and event.field == field)


def test_a_follower_sees_the_request_as_it_streams_and_ends_with_the_workers_record(
        real_redis: redis.Redis, settings: Settings, worker: Worker) -> None:
    producer = threading.Thread(target=publish, args=(real_redis, settings, "live", CHUNKS), kwargs={"pause": 0.005})
    producer.start()
    events = list(follow("live", client=real_redis, settings=settings))
    producer.join()
    final = events[-1]
    assert isinstance(final, Final) and final.record["status"] == "completed"
    message = final.record["completion"]["choices"][0]["message"]
    assert content(events) == message["content"]
    assert content(events, "reasoning_content") == message["reasoning_content"]
    assert [event.arguments for event in events if isinstance(event, ToolCallDone)] == [
        call["function"]["arguments"] for call in message["tool_calls"]]
    assert sum(isinstance(event, Final) for event in events) == 1


def test_following_after_the_finish_gives_the_same_events_and_resumes_at_any_token(
        real_redis: redis.Redis, settings: Settings, worker: Worker) -> None:
    publish(real_redis, settings, "done", CHUNKS)
    events = list(follow("done", client=real_redis, settings=settings))
    assert events == list(follow("done", client=real_redis, settings=settings))
    for position in (0, 1, len(events) // 2, len(events) - 2):
        resumed = list(follow("done", after=events[position].token, client=real_redis, settings=settings))
        assert resumed == events[position + 1:]
    assert list(follow("done", after=events[-1].token, client=real_redis, settings=settings)) == []


def test_after_the_chunks_expired_the_record_alone_gives_the_whole_answer(
        real_redis: redis.Redis, settings: Settings, worker: Worker) -> None:
    publish(real_redis, settings, "old", CHUNKS)
    live = list(follow("old", client=real_redis, settings=settings))
    real_redis.delete(settings.keys.chunks("old"))
    later = list(follow("old", client=real_redis, settings=settings))
    assert content(later) == content(live) and later[-1] == Final(later[-1].token, live[-1].record)  # type: ignore
    resumed_from_live = list(follow("old", after=live[3].token, client=real_redis, settings=settings))
    assert [type(event) for event in resumed_from_live] == [Final]


def test_a_request_whose_producer_died_ends_incomplete_instead_of_hanging(
        real_redis: redis.Redis, settings: Settings, worker: Worker) -> None:
    publish(real_redis, settings, "orphan", CHUNKS[:10], end=False)
    started = time.monotonic()
    events = list(follow("orphan", client=real_redis, settings=settings))
    assert isinstance(events[-1], Final) and events[-1].record["status"] == "incomplete"
    assert content(events, "reasoning_content") == events[-1].record["completion"]["choices"][0]["message"][
        "reasoning_content"]
    assert time.monotonic() - started < 30


def test_a_request_that_never_starts_times_out_only_when_asked_to(real_redis: redis.Redis,
                                                                  settings: Settings) -> None:
    with pytest.raises(ResultTimeout, match="has not started"):
        list(follow("never", wait=0.2, client=real_redis, settings=settings))


def test_the_asyncio_twin_yields_the_same_events(real_redis: redis.Redis, settings: Settings,
                                                 worker: Worker) -> None:
    publish(real_redis, settings, "twin", CHUNKS)
    expected = list(follow("twin", client=real_redis, settings=settings))

    async def collect() -> list[LiveEvent]:
        return [event async for event in afollow("twin", settings=settings)]

    assert asyncio.run(collect()) == expected


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STREAMFOLD_REDIS_URL": settings.redis_url, "STREAMFOLD_NAMESPACE": settings.namespace}
    return subprocess.run([sys.executable, "-m", "producer", "follow", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=30)


def test_the_command_prints_exactly_the_content_and_exits_by_the_status(
        real_redis: redis.Redis, settings: Settings, worker: Worker) -> None:
    publish(real_redis, settings, "cli", ANSWER)
    publish(real_redis, settings, "cli-tool", CHUNKS)
    publish(real_redis, settings, "cli-failed", CHUNKS[:5], end=False)
    done = _cli(settings, "cli")
    message = orjson.loads(real_redis.get(settings.keys.result("cli")))["completion"]["choices"][0]["message"]
    assert done.returncode == 0, done.stderr
    assert done.stdout == message["content"] and len(done.stdout) == 816
    assert message["reasoning_content"] in done.stderr
    tool = _cli(settings, "cli-tool")
    assert tool.returncode == 0 and tool.stdout == ""
    assert '[tool call 0 of choice 0: weather {"location": "San Francisco"}]' in tool.stderr

    stalled = _cli(settings, "cli-failed")
    assert stalled.returncode == 1 and stalled.stdout == ""
    assert "ended incomplete" in stalled.stderr

    lines = [orjson.loads(line) for line in _cli(settings, "cli", "--json").stdout.splitlines()]
    assert lines[-1]["type"] == "final" and all("token" in line for line in lines)
    resumed = _cli(settings, "cli", "--json", "--after", lines[2]["token"]).stdout.splitlines()
    assert [orjson.loads(line) for line in resumed] == lines[3:]

    bad = _cli(settings, "cli", "--after", "yesterday")
    assert bad.returncode == 2 and "not a resume token" in bad.stderr


