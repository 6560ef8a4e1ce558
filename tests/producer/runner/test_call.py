"""One call's rules: what it publishes for each way an upstream behaves, retries, cancels and re-runs, on fakeredis.

The upstream is a scripted server on loopback (tests/producer/scripted_upstream.py); backoff sleeps are recorded
instead of slept, and cancels are checked by calling the CancelWatch directly, so nothing here depends on timing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import orjson
import pytest

from producer.apis import Api
from producer.jobs import job_id
from producer.runner.call import CANCELLED, CancelWatch, Outcome
from producer.runner.calls import Calls
from producer.runner.loop import runner_lost
from streamfold.capture import CapturedItem
from streamfold.contract import Envelope, decode_envelope, decode_error
from streamfold.keys import Keys
from streamfold.settings import Settings
from tests.conftest import SEEDS, load_jsonl
from tests.producer.scripted_upstream import Handler, ScriptedUpstream, answer, events
from worker import assemble
from worker.request import RequestState

KEY = "sk-call-test-key-5f1e2d"
KEY_ENV = "CALL_TEST_KEY"
RID = "req-1"
FIXTURE = SEEDS / "qwen_mt_flash_incremental.jsonl"
BODY = {"model": "qwen_mt_flash_incremental", "messages": [{"role": "user", "content": "hi"}]}


# --- fakes ---------------------------------------------------------------------------------------------------

class Sleeps:
    """Records backoff waits instead of waiting; ``then`` runs after each (to cancel mid-wait)."""

    def __init__(self, then: Callable[[int], Awaitable[None]] | None = None) -> None:
        self.calls: list[float] = []
        self.then = then

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        if self.then is not None:
            await self.then(len(self.calls))


def chunks_of(path: Path = FIXTURE) -> list[bytes]:
    return load_jsonl(path)


def streaming(lines: list[bytes], *, drop_after: int | None = None, error: bytes | None = None,
              on_chunk: Callable[[int], Awaitable[None]] | None = None) -> Handler:
    """A 200 event stream of ``lines``, a write per event: cut after ``drop_after``, or ending with an error
    event; ``on_chunk(number)`` runs before each chunk is sent."""
    async def parts() -> AsyncIterator[bytes]:
        for number, line in enumerate(lines[:drop_after]):
            if on_chunk is not None:
                await on_chunk(number)
            yield b"data: " + line + b"\n\n"
        if drop_after is None:
            yield b"event: error\ndata: " + error + b"\n\n" if error is not None else b"data: [DONE]\n\n"

    return events(parts, cut=drop_after is not None)


def status(code: int, message: str = "nope", retry_after: str | None = None) -> Handler:
    headers = {} if retry_after is None else {"retry-after": retry_after}
    return answer(code, headers=headers, json={"error": {"message": message}})


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def redis(server: fakeredis.FakeServer) -> Iterator[fakeredis.FakeRedis]:
    """A blocking client on the same fake server, for looking at what the calls wrote."""
    client = fakeredis.FakeRedis(server=server)
    yield client
    client.close()


@pytest.fixture
def settings(namespace: str) -> Settings:
    return Settings(namespace=namespace, shards=2, upstream_retries=3, upstream_backoff=1.0, upstream_backoff_max=10.0,
                    upstreams={"default": {"base_url": "http://upstream.test/v1", "api_key_env": KEY_ENV,
                                           "mode": "incremental"}})


def perform(server: fakeredis.FakeServer, settings: Settings, upstream: ScriptedUpstream, *,
            sleep: Sleeps | None = None, adopted: bool = False, meta: dict[str, Any] | None = None) -> tuple[Outcome, int]:
    """Run one call to its end against ``upstream``; returns its outcome and the upstream calls it made."""
    async def go() -> tuple[Outcome, int]:
        client = fakeredis.FakeAsyncRedis(server=server)
        async with upstream:
            async with Calls(answered_by(settings, upstream), client, environ={KEY_ENV: KEY},
                             sleep=sleep or Sleeps()) as calls:
                PERFORMING.append(calls)
                call, problem = calls.call(RID, "default", BODY, meta or {"user": "u1"}, adopted=adopted)
                outcome = await calls.run(call, problem)
        await client.aclose()
        return outcome, call.calls
    PERFORMING.clear()
    return asyncio.run(go())


def answered_by(settings: Settings, upstream: ScriptedUpstream) -> Settings:
    """``settings`` with the default upstream at the scripted server."""
    default = settings.upstream("default").model_copy(update={"base_url": upstream.url()})
    return settings.model_copy(update={"upstreams": {**settings.upstreams, "default": default}})


PERFORMING: list[Calls] = []  # the Calls of the run in progress, for fakes that cancel mid-call


async def cancel_now(redis: fakeredis.FakeRedis, keys: Keys) -> None:
    """What ``producer.cancel`` does to a running call, then the cancel watch's next look."""
    redis.set(keys.cancel(RID), CANCELLED)
    await PERFORMING[0].cancels.check()
    await asyncio.sleep(0)  # the interrupted call runs on from here


async def published(redis: fakeredis.FakeRedis, keys: Keys, count: int) -> None:
    """Wait until ``count`` envelopes of the request are in Redis (the batcher sends them within milliseconds)."""
    for _ in range(500):
        if redis.xlen(keys.chunks(RID)) >= count:
            return
        await asyncio.sleep(0.002)
    raise AssertionError(f"{count} envelopes were never published")


def envelopes(redis: fakeredis.FakeRedis, keys: Keys, request_id: str = RID) -> list[Envelope]:
    return [decode_envelope(fields) for _, fields in redis.xrange(keys.chunks(request_id))]


def kinds(redis: fakeredis.FakeRedis, keys: Keys) -> list[tuple[str, int]]:
    return [(envelope.kind, envelope.attempt) for envelope in envelopes(redis, keys)]


def worker_record(redis: fakeredis.FakeRedis, keys: Keys) -> dict[str, Any]:
    """What a worker would finish the request with: the chunk stream fed through its RequestState."""
    state = RequestState(RID, "1-0", now=0.0)
    for entry_id, fields in redis.xrange(keys.chunks(RID)):
        state.feed(entry_id.decode(), fields, now=0.0)
    assert state.ended
    return dict(state.outcome(finished_at_ms=0).record)


# --- one call ------------------------------------------------------------------------------------------------

def test_a_clean_stream_is_published_as_start_each_raw_chunk_and_end(server: fakeredis.FakeServer,
                                                                      redis: fakeredis.FakeRedis,
                                                                      settings: Settings) -> None:
    upstream = ScriptedUpstream(streaming(chunks_of()))
    outcome, calls = perform(server, settings, upstream)

    keys, published = settings.keys, envelopes(redis, settings.keys)
    assert (outcome, calls) == ("ended", 1)
    assert [e.kind for e in published] == ["start"] + ["chunk"] * len(chunks_of()) + ["end"]
    assert [e.payload for e in published if e.kind == "chunk"] == chunks_of()
    assert [e.seq for e in published if e.kind == "chunk"] == list(range(len(chunks_of())))
    assert published[-1].chunks == len(chunks_of())  # the end counts them: lost last chunks can be told
    # The job's token: a re-run of the same job may start the request again, no other producer may. The
    # upstream's API is the stream's format; the model asked for names the call for analytics.
    assert orjson.loads(published[0].payload) == {"meta": {"user": "u1"}, "mode": "incremental",
                                                  "token": job_id(keys, RID), "format": "chat",
                                                  "request_model": "qwen_mt_flash_incremental"}
    assert upstream.requests[0].headers["authorization"] == f"Bearer {KEY}"
    record = worker_record(redis, keys)
    assert record["completion"] == assemble(chunks_of())["completion"]
    assert record["status"] == "completed"


def test_an_error_event_fails_the_request_with_the_upstreams_error(server: fakeredis.FakeServer,
                                                                   redis: fakeredis.FakeRedis,
                                                                   settings: Settings) -> None:
    error = b'{"error": {"message": "model overloaded", "type": "server_error"}}'
    outcome, _ = perform(server, settings, ScriptedUpstream(streaming(chunks_of()[:2], error=error)))
    assert outcome == "failed"
    assert kinds(redis, settings.keys) == [("start", 0), ("chunk", 0), ("chunk", 0), ("error", 0)]
    assert worker_record(redis, settings.keys)["error"]["message"] == "model overloaded"


def test_a_malformed_chunk_is_pushed_as_it_came_for_the_worker_to_reject(server: fakeredis.FakeServer,
                                                                         redis: fakeredis.FakeRedis,
                                                                         settings: Settings) -> None:
    lines = [chunks_of()[0], b"{not json", chunks_of()[1]]
    assert perform(server, settings, ScriptedUpstream(streaming(lines)))[0] == "ended"
    assert [e.payload for e in envelopes(redis, settings.keys) if e.kind == "chunk"][1] == b"{not json"
    assert worker_record(redis, settings.keys)["error"]["type"] == "invalid_chunk"


def test_an_unknown_upstream_fails_the_request_as_a_config_error(server: fakeredis.FakeServer,
                                                                 redis: fakeredis.FakeRedis, settings: Settings) -> None:
    async def go() -> Outcome:
        async with Calls(settings, fakeredis.FakeAsyncRedis(server=server), environ={}) as calls:
            call, problem = calls.call(RID, "nope", BODY, {})
            return await calls.run(call, problem)

    assert asyncio.run(go()) == "failed"
    error = decode_error(envelopes(redis, settings.keys)[-1])
    assert error["type"] == "config_error" and "nope" in error["message"]


# --- retries -------------------------------------------------------------------------------------------------

def test_a_429_is_retried_after_its_retry_after_without_a_new_attempt(server: fakeredis.FakeServer,
                                                                      redis: fakeredis.FakeRedis,
                                                                      settings: Settings) -> None:
    sleeps = Sleeps()
    outcome, calls = perform(server, settings, ScriptedUpstream(status(429, retry_after="3"), streaming(chunks_of())),
                             sleep=sleeps)
    assert (outcome, calls, sleeps.calls) == ("ended", 2, [3.0])
    assert {attempt for _, attempt in kinds(redis, settings.keys)} == {0}


def test_server_errors_are_retried_with_growing_backoff_then_fail_with_the_status_and_message(
        server: fakeredis.FakeServer, redis: fakeredis.FakeRedis, settings: Settings) -> None:
    sleeps = Sleeps()
    settings = settings.model_copy(update={"upstream_retries": 2})
    outcome, calls = perform(server, settings, ScriptedUpstream(*[status(500, "The server had an error")] * 3), sleep=sleeps)

    assert (outcome, calls) == ("failed", 3)
    # backoff 1.0 doubling, with jitter between half and all of it: 0.5..1 then 1..2 seconds.
    assert 0.5 <= sleeps.calls[0] <= 1.0 and 1.0 <= sleeps.calls[1] <= 2.0
    error = decode_error(envelopes(redis, settings.keys)[-1])
    assert error == {"message": "The server had an error", "type": "server_error", "status": 500, "code": None}
    assert worker_record(redis, settings.keys)["status"] == "failed"


def test_a_client_error_fails_at_once(server: fakeredis.FakeServer, redis: fakeredis.FakeRedis,
                                      settings: Settings) -> None:
    assert perform(server, settings, ScriptedUpstream(status(400, "messages is required"))) == ("failed", 1)
    assert decode_error(envelopes(redis, settings.keys)[-1])["status"] == 400


def test_a_retry_after_the_stream_broke_is_a_new_attempt_and_assembles_only_the_clean_one(
        server: fakeredis.FakeServer, redis: fakeredis.FakeRedis, settings: Settings) -> None:
    lines = chunks_of()
    assert perform(server, settings, ScriptedUpstream(streaming(lines, drop_after=3), streaming(lines))) == ("ended", 2)
    assert kinds(redis, settings.keys) == ([("start", 0)] + [("chunk", 0)] * 3 + [("chunk", 1)] * len(lines)
                                           + [("end", 1)])
    record = worker_record(redis, settings.keys)
    assert record["completion"] == assemble(lines)["completion"]
    assert record["metrics"]["attempts"] == 2


def test_a_stream_that_breaks_on_every_try_fails_with_the_last_attempts_partial_output(
        server: fakeredis.FakeServer, redis: fakeredis.FakeRedis, settings: Settings) -> None:
    lines = chunks_of()
    settings = settings.model_copy(update={"upstream_retries": 1})
    upstream = ScriptedUpstream(streaming(lines, drop_after=2), streaming(lines, drop_after=4))
    assert perform(server, settings, upstream) == ("failed", 2)
    assert kinds(redis, settings.keys)[-1] == ("error", 1)
    record = worker_record(redis, settings.keys)
    assert record["status"] == "failed" and record["error"]["type"] == "connection_error"
    assert record["completion"] == assemble(lines[:4])["completion"]


# --- cancellation --------------------------------------------------------------------------------------------

def test_a_cancel_between_chunks_stops_the_call_and_fails_the_request_cancelled(
        server: fakeredis.FakeServer, redis: fakeredis.FakeRedis, settings: Settings) -> None:
    async def cancel_at(number: int) -> None:
        if number == 4:
            await published(redis, settings.keys, 1 + 4)  # the start and the four chunks sent so far
            await cancel_now(redis, settings.keys)

    assert perform(server, settings, ScriptedUpstream(streaming(chunks_of(), on_chunk=cancel_at)))[0] == "cancelled"
    assert kinds(redis, settings.keys) == [("start", 0)] + [("chunk", 0)] * 4 + [("error", 0)]
    assert decode_error(envelopes(redis, settings.keys)[-1])["type"] == "cancelled"


def test_a_cancel_during_a_backoff_wait_ends_the_wait(server: fakeredis.FakeServer, redis: fakeredis.FakeRedis,
                                                      settings: Settings) -> None:
    async def cancel_in_wait(count: int) -> None:
        await cancel_now(redis, settings.keys)
        await asyncio.sleep(1)  # the wait the cancel cuts short

    outcome, calls = perform(server, settings, ScriptedUpstream(status(503, retry_after="5")), sleep=Sleeps(cancel_in_wait))
    assert (outcome, calls) == ("cancelled", 1)
    assert decode_error(envelopes(redis, settings.keys)[-1])["type"] == "cancelled"


def test_a_cancel_lost_on_its_way_is_asked_again_at_the_watchs_next_look(
        server: fakeredis.FakeServer, redis: fakeredis.FakeRedis, settings: Settings) -> None:
    async def lose_the_first_cancel(count: int) -> None:
        try:
            await cancel_now(redis, settings.keys)
        except asyncio.CancelledError:
            pass  # lost, as Python 3.11's wait_for loses a cancel that lands just as its operation completes
        await PERFORMING[0].cancels.check()  # the watch's next look
        await asyncio.sleep(1)  # the wait the second cancel cuts short

    outcome, calls = perform(server, settings, ScriptedUpstream(status(503, retry_after="5")),
                             sleep=Sleeps(lose_the_first_cancel))
    assert (outcome, calls) == ("cancelled", 1)
    assert decode_error(envelopes(redis, settings.keys)[-1])["type"] == "cancelled"


def test_a_job_that_finds_its_request_cancelled_publishes_nothing(server: fakeredis.FakeServer,
                                                                  redis: fakeredis.FakeRedis, settings: Settings) -> None:
    redis.set(settings.keys.cancel(RID), CANCELLED)
    upstream = ScriptedUpstream(streaming(chunks_of()))
    assert perform(server, settings, upstream) == ("skipped", 0)
    assert upstream.requests == [] and redis.exists(settings.keys.chunks(RID)) == 0


def test_an_adopted_call_found_cancelled_publishes_the_cancel_its_lost_runner_owed(
        server: fakeredis.FakeServer, redis: fakeredis.FakeRedis, settings: Settings) -> None:
    redis.set(settings.keys.cancel(RID), CANCELLED)  # the lost runner had claimed it; cancel only raised the flag
    upstream = ScriptedUpstream(streaming(chunks_of()))
    assert perform(server, settings, upstream, adopted=True) == ("cancelled", 0)
    assert upstream.requests == []
    assert [kind for kind, _ in kinds(redis, settings.keys)] == ["start", "error"]
    assert worker_record(redis, settings.keys)["error"]["type"] == "cancelled"


def test_the_cancel_keys_of_every_call_in_flight_are_read_in_one_round_trip(settings: Settings) -> None:
    reads: list[list[str]] = []

    class Pipeline:
        def __init__(self) -> None:
            self.keys: list[str] = []

        async def __aenter__(self) -> Pipeline:
            return self

        async def __aexit__(self, *exc: object) -> None:
            return None

        def execute_command(self, command: str, *keys: str) -> None:
            assert command == "MGET"
            self.keys.extend(keys)

        async def execute(self) -> list[list[bytes | None]]:
            reads.append(self.keys)
            return [[None] * len(self.keys)] * len(self.keys)

    class Client:
        def pipeline(self, transaction: bool) -> Pipeline:
            return Pipeline()

    class Watched:
        def __init__(self, request_id: str) -> None:
            self.request_id = request_id

    watch = CancelWatch(Client(), settings.keys)  # type: ignore[arg-type]
    for number in range(1000):
        watch.watch(Watched(f"r{number}"))  # type: ignore[arg-type]
    asyncio.run(watch.check())
    assert len(reads) == 1 and len(reads[0]) == 1000


# --- re-runs -------------------------------------------------------------------------------------------------

def test_a_rerun_supersedes_what_the_lost_run_published_without_starting_again(
        server: fakeredis.FakeServer, redis: fakeredis.FakeRedis, settings: Settings) -> None:
    lines, keys = chunks_of(), settings.keys
    settings = settings.model_copy(update={"upstream_retries": 0})
    assert perform(server, settings, ScriptedUpstream(streaming(lines, drop_after=2)))[0] == "failed"
    (last_id, _), = redis.xrevrange(keys.chunks(RID), count=1)
    redis.xdel(keys.chunks(RID), last_id)  # as if the first run had died after two chunks
    control = redis.xlen(keys.requests(keys.shard(RID)))

    assert perform(server, settings, ScriptedUpstream(streaming(lines)), adopted=True)[0] == "ended"
    assert kinds(redis, keys)[-1] == ("end", 1)
    assert [kind for kind, _ in kinds(redis, keys)].count("start") == 1
    assert redis.xlen(keys.requests(keys.shard(RID))) == control  # not handed to the workers a second time
    assert worker_record(redis, keys)["completion"] == assemble(lines)["completion"]


def test_a_rerun_after_a_run_that_retried_starts_above_every_earlier_attempt(
        server: fakeredis.FakeServer, redis: fakeredis.FakeRedis, settings: Settings) -> None:
    lines, keys = chunks_of(), settings.keys
    # The first run is cut twice after chunks were pushed (attempts 0 and 1), then its third call fails.
    first = ScriptedUpstream(streaming(lines, drop_after=2), streaming(lines, drop_after=3), streaming(lines, drop_after=1))
    assert perform(server, settings.model_copy(update={"upstream_retries": 2}), first)[0] == "failed"
    (last_id, _), = redis.xrevrange(keys.chunks(RID), count=1)
    redis.xdel(keys.chunks(RID), last_id)  # as if the first run had died in its third attempt
    assert perform(server, settings, ScriptedUpstream(streaming(lines)))[0] == "ended"
    assert kinds(redis, keys)[-1] == ("end", 3)
    record = worker_record(redis, keys)
    assert record["status"] == "completed" and record["completion"] == assemble(lines)["completion"]


def test_a_rerun_of_a_call_whose_stream_already_ended_calls_nobody(server: fakeredis.FakeServer,
                                                                   redis: fakeredis.FakeRedis,
                                                                   settings: Settings) -> None:
    assert perform(server, settings, ScriptedUpstream(streaming(chunks_of())))[0] == "ended"
    upstream = ScriptedUpstream(streaming(chunks_of()))
    assert perform(server, settings, upstream, adopted=True) == ("ended", 0)
    assert upstream.requests == [] and [kind for kind, _ in kinds(redis, settings.keys)].count("end") == 1


def test_a_call_that_may_not_be_rerun_again_fails_runner_lost_in_its_newest_attempt(
        server: fakeredis.FakeServer, redis: fakeredis.FakeRedis, settings: Settings) -> None:
    lines = chunks_of()
    settings = settings.model_copy(update={"upstream_retries": 1})
    perform(server, settings, ScriptedUpstream(streaming(lines, drop_after=2), streaming(lines, drop_after=4)))
    (last_id, _), = redis.xrevrange(settings.keys.chunks(RID), count=1)
    redis.xdel(settings.keys.chunks(RID), last_id)  # the run died in its attempt 1

    async def give_up() -> Outcome:
        async with Calls(settings, fakeredis.FakeAsyncRedis(server=server), environ={KEY_ENV: KEY}) as calls:
            call, _ = calls.call(RID, "default", BODY, {}, adopted=True)
            return await call.give_up(runner_lost(1))

    assert asyncio.run(give_up()) == "failed"
    assert kinds(redis, settings.keys)[-1] == ("error", 1)
    assert worker_record(redis, settings.keys)["error"]["type"] == "runner_lost"


def test_a_call_that_crashes_fails_its_request_and_reraises(server: fakeredis.FakeServer, redis: fakeredis.FakeRedis,
                                                            settings: Settings,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Api, event: bytes, data: bytes) -> CapturedItem:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Api, "item", broken)
    with pytest.raises(RuntimeError):
        perform(server, settings, ScriptedUpstream(streaming(chunks_of())))
    assert decode_error(envelopes(redis, settings.keys)[-1])["type"] == "producer_error"

