"""Producer jobs: what a call publishes for each way an upstream behaves, retries and cancels, on fakeredis.

The upstream is an ``httpx.MockTransport``; time is injected (sleep and clock), so nothing here waits.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import httpx
import orjson
import pytest
from rq import Queue
from rq.job import Job, JobStatus

from producer import jobs
from producer.jobs import CompletionRun, cancel, enqueue_chat_completion, job_id, request_body
from producer.upstream import RetryPolicy, UpstreamClient
from streamfold.contract import Envelope, decode_envelope, decode_error
from streamfold.errors import ConfigError, ContractError
from streamfold.keys import Keys
from streamfold.settings import Settings, Upstream
from tests.conftest import SEEDS, load_jsonl
from worker import assemble
from worker.request import RequestState

KEY = "sk-jobs-test-key-5f1e2d"
RID = "req-1"
FIXTURE = SEEDS / "qwen_mt_flash_incremental.jsonl"
BODY = {"model": "qwen_mt_flash_incremental", "messages": [{"role": "user", "content": "hi"}]}

Handler = Callable[[httpx.Request], httpx.Response]


# --- fakes ---------------------------------------------------------------------------------------------------

class Upstreams:
    """A scripted upstream: each call takes the next handler; records every request."""

    def __init__(self, *handlers: Handler) -> None:
        self.handlers = list(handlers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.handlers.pop(0)(request)


class Sleeps:
    """Records sleeps instead of sleeping; ``then`` runs after the n-th one (to cancel mid-wait)."""

    def __init__(self, then: Callable[[int], None] | None = None) -> None:
        self.calls: list[float] = []
        self.then = then

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        if self.then is not None:
            self.then(len(self.calls))


def chunks_of(path: Path = FIXTURE) -> list[bytes]:
    return load_jsonl(path)


def streaming(lines: list[bytes], *, drop_after: int | None = None, error: bytes | None = None,
              on_chunk: Callable[[int], None] | None = None) -> Handler:
    """A 200 event stream of ``lines``: cut after ``drop_after``, or ending with an error event."""
    def parts() -> Iterator[bytes]:
        for number, line in enumerate(lines):
            if number == drop_after:
                raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")
            if on_chunk is not None:
                on_chunk(number)
            yield b"data: " + line + b"\n\n"
        if error is not None:
            yield b"event: error\ndata: " + error + b"\n\n"
        else:
            yield b"data: [DONE]\n\n"

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=_Stream(parts()))
    return handler


class _Stream(httpx.SyncByteStream):
    def __init__(self, parts: Iterator[bytes]) -> None:
        self.parts = parts
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield from self.parts

    def close(self) -> None:
        self.closed = True


def status(code: int, message: str = "nope", retry_after: str | None = None) -> Handler:
    headers = {} if retry_after is None else {"retry-after": retry_after}
    return lambda request: httpx.Response(code, headers=headers, json={"error": {"message": message}})


@pytest.fixture
def keys(namespace: str) -> Keys:
    return Keys(namespace=namespace, shards=2)


@pytest.fixture
def settings(namespace: str) -> Settings:
    return Settings(namespace=namespace, shards=2, queue=f"{namespace}-jobs",
                    upstreams={"default": {"base_url": "http://upstream.test/v1", "api_key_env": "JOBS_TEST_KEY"}})


def perform(client: fakeredis.FakeRedis, keys: Keys, upstream: Upstreams, *, retries: int = 3,
            sleep: Callable[[float], None] | None = None, meta: dict[str, Any] | None = None,
            clock: Callable[[], float] | None = None) -> tuple[str, CompletionRun]:
    run = CompletionRun(client, keys, policy=RetryPolicy(retries=retries, backoff=1.0, backoff_max=10.0),
                        sleep=sleep or Sleeps(), clock=clock or itertools.count().__next__)
    with UpstreamClient("http://upstream.test/v1", api_key=KEY, transport=httpx.MockTransport(upstream)) as http:
        outcome = run.run(RID, http, BODY, meta=meta or {"user": "u1"}, mode="incremental")
    return outcome, run


def envelopes(client: fakeredis.FakeRedis, keys: Keys, request_id: str = RID) -> list[Envelope]:
    return [decode_envelope(fields) for _, fields in client.xrange(keys.chunks(request_id))]


def kinds(client: fakeredis.FakeRedis, keys: Keys) -> list[tuple[str, int]]:
    return [(envelope.kind, envelope.attempt) for envelope in envelopes(client, keys)]


def worker_record(client: fakeredis.FakeRedis, keys: Keys) -> dict[str, Any]:
    """What a worker would finish the request with: the chunk stream fed through its RequestState."""
    entries = client.xrange(keys.chunks(RID))
    state = RequestState(RID, "1-0", now=0.0)
    for entry_id, fields in entries:
        state.feed(entry_id.decode(), fields, now=0.0)
    assert state.ended
    return dict(state.outcome(finished_at_ms=0).record)


def everything_in(client: fakeredis.FakeRedis) -> bytes:
    """Every key and value in the fake Redis, for looking for a secret."""
    dump = []
    for key in client.scan_iter():
        dump.append(key)
        kind = client.type(key)
        if kind == b"string":
            dump.append(client.get(key) or b"")
        elif kind == b"hash":
            dump.extend(itertools.chain.from_iterable(client.hgetall(key).items()))
        elif kind == b"list":
            dump.extend(client.lrange(key, 0, -1))
        elif kind == b"stream":
            dump.extend(orjson.dumps({k.decode(): v.decode(errors="replace") for k, v in fields.items()})
                        for _, fields in client.xrange(key))
        elif kind in (b"set", b"zset"):
            dump.extend(client.zrange(key, 0, -1) if kind == b"zset" else client.smembers(key))
    return b"\n".join(dump)


# --- one call ------------------------------------------------------------------------------------------------

def test_a_clean_stream_is_published_as_start_each_raw_chunk_and_end(fake_redis: fakeredis.FakeRedis,
                                                                      keys: Keys) -> None:
    upstream = Upstreams(streaming(chunks_of()))
    outcome, run = perform(fake_redis, keys, upstream)

    published = envelopes(fake_redis, keys)
    assert outcome == "ended" and run.calls == 1
    assert [e.kind for e in published] == ["start"] + ["chunk"] * len(chunks_of()) + ["end"]
    assert [e.payload for e in published if e.kind == "chunk"] == chunks_of()
    assert [e.seq for e in published if e.kind == "chunk"] == list(range(len(chunks_of())))
    # The job's token: a re-run of the same job may start the request again, no other producer may.
    assert orjson.loads(published[0].payload) == {"meta": {"user": "u1"}, "mode": "incremental",
                                                  "token": job_id(keys, "req-1")}
    record = worker_record(fake_redis, keys)
    assert record["completion"] == assemble(chunks_of())["completion"]
    assert record["status"] == "completed"


def test_the_body_sent_asks_for_a_stream_with_usage_and_merges_the_upstreams_defaults() -> None:
    upstream = Upstream(base_url="http://x", params={"temperature": 0, "model": "default-model",
                                                      "stream_options": {"extra": 1}})
    body = request_body(upstream, {"model": "m", "stream": False, "messages": []})
    assert body == {"temperature": 0, "model": "m", "messages": [], "stream": True,
                    "stream_options": {"extra": 1, "include_usage": True}}


def test_an_error_event_fails_the_request_with_the_upstreams_error(fake_redis: fakeredis.FakeRedis,
                                                                   keys: Keys) -> None:
    error = b'{"error": {"message": "model overloaded", "type": "server_error"}}'
    outcome, _ = perform(fake_redis, keys, Upstreams(streaming(chunks_of()[:2], error=error)))
    assert outcome == "failed"
    assert kinds(fake_redis, keys) == [("start", 0), ("chunk", 0), ("chunk", 0), ("error", 0)]
    assert worker_record(fake_redis, keys)["error"]["message"] == "model overloaded"


def test_a_malformed_chunk_is_pushed_as_it_came_for_the_worker_to_reject(fake_redis: fakeredis.FakeRedis,
                                                                         keys: Keys) -> None:
    outcome, _ = perform(fake_redis, keys, Upstreams(streaming([chunks_of()[0], b"{not json", chunks_of()[1]])))
    assert outcome == "ended"
    assert [e.payload for e in envelopes(fake_redis, keys) if e.kind == "chunk"][1] == b"{not json"
    assert worker_record(fake_redis, keys)["error"]["type"] == "invalid_chunk"


# --- retries -------------------------------------------------------------------------------------------------

def test_a_429_is_retried_after_its_retry_after_without_a_new_attempt(fake_redis: fakeredis.FakeRedis,
                                                                      keys: Keys) -> None:
    sleeps = Sleeps()
    outcome, run = perform(fake_redis, keys, Upstreams(status(429, retry_after="3"), streaming(chunks_of())),
                           sleep=sleeps)
    assert outcome == "ended" and run.calls == 2
    assert sum(sleeps.calls) == pytest.approx(3.0)
    assert {attempt for _, attempt in kinds(fake_redis, keys)} == {0}


def test_server_errors_are_retried_with_growing_backoff_then_fail_with_the_status_and_message(
        fake_redis: fakeredis.FakeRedis, keys: Keys) -> None:
    sleeps = Sleeps()
    upstream = Upstreams(*[status(500, "The server had an error")] * 3)
    outcome, run = perform(fake_redis, keys, upstream, retries=2, sleep=sleeps)

    assert outcome == "failed" and run.calls == 3
    # backoff 1.0 doubling, with jitter between half and all of it: 0.5..1 then 1..2 seconds.
    waits = [sum(group) for group in _waits(sleeps.calls, 2)]
    assert 0.5 <= waits[0] <= 1.0 and 1.0 <= waits[1] <= 2.0
    error = decode_error(envelopes(fake_redis, keys)[-1])
    assert error == {"message": "The server had an error", "type": "server_error", "status": 500, "code": None}
    assert worker_record(fake_redis, keys)["status"] == "failed"


def _waits(calls: list[float], count: int) -> list[list[float]]:
    """Sleeps grouped per retry wait: each wait is cut into slices of at most the check interval."""
    groups: list[list[float]] = [[]]
    for seconds in calls:
        groups[-1].append(seconds)
        if seconds < jobs.CANCEL_CHECK_INTERVAL - 1e-9:
            groups.append([])
    return [group for group in groups if group][:count]


def test_a_client_error_fails_at_once(fake_redis: fakeredis.FakeRedis, keys: Keys) -> None:
    outcome, run = perform(fake_redis, keys, Upstreams(status(400, "messages is required")))
    assert (outcome, run.calls) == ("failed", 1)
    assert decode_error(envelopes(fake_redis, keys)[-1])["status"] == 400


def test_a_retry_after_the_stream_broke_is_a_new_attempt_and_assembles_only_the_clean_one(
        fake_redis: fakeredis.FakeRedis, keys: Keys) -> None:
    lines = chunks_of()
    outcome, run = perform(fake_redis, keys, Upstreams(streaming(lines, drop_after=3), streaming(lines)))

    assert outcome == "ended" and run.calls == 2
    assert kinds(fake_redis, keys) == ([("start", 0)] + [("chunk", 0)] * 3 + [("chunk", 1)] * len(lines)
                                       + [("end", 1)])
    record = worker_record(fake_redis, keys)
    assert record["completion"] == assemble(lines)["completion"]
    assert record["metrics"]["attempts"] == 2


def test_a_stream_that_breaks_on_every_try_fails_with_the_last_attempts_partial_output(
        fake_redis: fakeredis.FakeRedis, keys: Keys) -> None:
    lines = chunks_of()
    outcome, run = perform(fake_redis, keys, Upstreams(streaming(lines, drop_after=2), streaming(lines, drop_after=4)),
                           retries=1)
    assert (outcome, run.calls) == ("failed", 2)
    assert kinds(fake_redis, keys)[-1] == ("error", 1)
    record = worker_record(fake_redis, keys)
    assert record["status"] == "failed" and record["error"]["type"] == "connection_error"
    assert record["completion"] == assemble(lines[:4])["completion"]


# --- cancellation --------------------------------------------------------------------------------------------

def test_a_cancel_between_chunks_stops_the_call_and_fails_the_request_cancelled(
        fake_redis: fakeredis.FakeRedis, keys: Keys) -> None:
    def cancel_at(number: int) -> None:
        if number == 4:
            fake_redis.set(keys.cancel(RID), jobs.CANCELLED)

    outcome, _ = perform(fake_redis, keys, Upstreams(streaming(chunks_of(), on_chunk=cancel_at)))
    assert outcome == "cancelled"
    assert kinds(fake_redis, keys) == [("start", 0)] + [("chunk", 0)] * 4 + [("error", 0)]
    assert decode_error(envelopes(fake_redis, keys)[-1])["type"] == "cancelled"


def test_the_cancel_flag_is_read_at_most_once_per_check_interval(fake_redis: fakeredis.FakeRedis, keys: Keys,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    reads: Counter[bytes] = Counter()
    read = fake_redis.get

    def counting_read(name: str) -> Any:
        reads[name.encode()] += 1
        return read(name)

    monkeypatch.setattr(fake_redis, "get", counting_read)
    outcome, _ = perform(fake_redis, keys, Upstreams(streaming(chunks_of())), clock=lambda: 5.0)
    assert outcome == "ended"
    assert reads[keys.cancel(RID).encode()] == 1  # 13 chunks, all within one check interval


def test_a_cancel_during_a_backoff_wait_ends_the_wait(fake_redis: fakeredis.FakeRedis, keys: Keys) -> None:
    sleeps = Sleeps(then=lambda count: fake_redis.set(keys.cancel(RID), jobs.CANCELLED) if count == 2 else None)
    outcome, run = perform(fake_redis, keys, Upstreams(status(503, retry_after="5")), sleep=sleeps)
    assert (outcome, run.calls, len(sleeps.calls)) == ("cancelled", 1, 2)
    assert decode_error(envelopes(fake_redis, keys)[-1])["type"] == "cancelled"


def test_a_job_that_finds_its_request_cancelled_publishes_nothing(fake_redis: fakeredis.FakeRedis,
                                                                  keys: Keys) -> None:
    fake_redis.set(keys.cancel(RID), jobs.CANCELLED)
    upstream = Upstreams(streaming(chunks_of()))
    outcome, run = perform(fake_redis, keys, upstream)
    assert (outcome, run.calls, upstream.requests) == ("skipped", 0, [])
    assert fake_redis.exists(keys.chunks(RID)) == 0


def test_a_rerun_job_supersedes_what_the_crashed_run_published(fake_redis: fakeredis.FakeRedis,
                                                               keys: Keys) -> None:
    lines = chunks_of()
    outcome, _ = perform(fake_redis, keys, Upstreams(streaming(lines, drop_after=2)), retries=0)
    assert outcome == "failed"
    (last_id, _), = fake_redis.xrevrange(keys.chunks(RID), count=1)
    fake_redis.xdel(keys.chunks(RID), last_id)  # as if the first run had died after two chunks
    outcome, _ = perform(fake_redis, keys, Upstreams(streaming(lines)))
    assert outcome == "ended"
    assert kinds(fake_redis, keys)[-1] == ("end", 1)
    assert worker_record(fake_redis, keys)["completion"] == assemble(lines)["completion"]


def test_a_rerun_after_a_run_that_retried_starts_above_every_earlier_attempt(
        fake_redis: fakeredis.FakeRedis, keys: Keys) -> None:
    lines = chunks_of()
    # The first run is cut twice after chunks were pushed (attempts 0 and 1), then its third call fails.
    outcome, _ = perform(fake_redis, keys, Upstreams(streaming(lines, drop_after=2), streaming(lines, drop_after=3),
                                                     streaming(lines, drop_after=1)), retries=2)
    assert outcome == "failed"
    (last_id, _), = fake_redis.xrevrange(keys.chunks(RID), count=1)
    fake_redis.xdel(keys.chunks(RID), last_id)  # as if the first run had died in its third attempt
    outcome, _ = perform(fake_redis, keys, Upstreams(streaming(lines)))
    assert outcome == "ended"
    assert kinds(fake_redis, keys)[-1] == ("end", 3)
    record = worker_record(fake_redis, keys)
    assert record["status"] == "completed"
    assert record["completion"] == assemble(lines)["completion"]


def test_a_job_that_crashes_fails_its_request_and_reraises(fake_redis: fakeredis.FakeRedis, keys: Keys) -> None:
    def broken(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError):
        perform(fake_redis, keys, Upstreams(broken))
    assert decode_error(envelopes(fake_redis, keys)[-1])["type"] == "producer_error"


# --- enqueue and cancel --------------------------------------------------------------------------------------

def test_enqueue_puts_one_job_on_the_queue_with_no_key_and_no_messages_in_its_description(
        fake_redis: fakeredis.FakeRedis, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBS_TEST_KEY", KEY)
    request_id = enqueue_chat_completion(BODY, meta={"user": "u1"}, client=fake_redis, settings=settings)

    queue = Queue(settings.queue, connection=fake_redis)
    (job,) = queue.get_jobs()
    assert job.id == job_id(settings.keys, request_id)
    assert job.func is jobs.run_chat_completion
    assert job.kwargs == {"request_id": request_id, "upstream": "default", "params": BODY, "meta": {"user": "u1"}}
    assert job.description == f"chat completion {request_id} via default"
    assert KEY.encode() not in everything_in(fake_redis)


def test_enqueue_refuses_unknown_upstreams_reused_ids_and_params_that_are_not_json(
        fake_redis: fakeredis.FakeRedis, settings: Settings) -> None:
    with pytest.raises(ConfigError, match="unknown upstream 'nope'"):
        enqueue_chat_completion(BODY, upstream="nope", client=fake_redis, settings=settings)
    enqueue_chat_completion(BODY, request_id="fixed-id", client=fake_redis, settings=settings)
    with pytest.raises(ContractError, match="already enqueued"):
        enqueue_chat_completion(BODY, request_id="fixed-id", client=fake_redis, settings=settings)
    with pytest.raises(ContractError, match="JSON"):
        enqueue_chat_completion({"model": object()}, client=fake_redis, settings=settings)
    with pytest.raises(ContractError, match="whitespace"):
        enqueue_chat_completion(BODY, request_id="has space", client=fake_redis, settings=settings)


def test_job_ids_are_rq_safe_and_differ_between_namespaces() -> None:
    first, second = job_id(Keys("a"), "x:y/z"), job_id(Keys("b"), "x:y/z")
    assert first != second and first.replace("-", "").isalnum()


def test_cancel_before_the_job_started_removes_it_and_publishes_one_failure(
        fake_redis: fakeredis.FakeRedis, settings: Settings) -> None:
    request_id = enqueue_chat_completion(BODY, meta={"user": "u1"}, client=fake_redis, settings=settings)
    assert cancel(request_id, client=fake_redis, settings=settings) is True

    keys = settings.keys
    job = Job.fetch(job_id(keys, request_id), connection=fake_redis)
    assert job.get_status() == JobStatus.CANCELED
    assert Queue(settings.queue, connection=fake_redis).count == 0
    published = envelopes(fake_redis, keys, request_id)
    assert [e.kind for e in published] == ["start", "error"]
    assert orjson.loads(published[0].payload)["meta"] == {"user": "u1"}
    assert decode_error(published[1])["type"] == "cancelled"
    assert fake_redis.xlen(keys.requests(keys.shard(request_id))) == 1
    # A runner that dequeued the job just before the cancel finds the request taken, and leaves it.
    run = CompletionRun(fake_redis, keys)
    assert run.run(request_id, UpstreamClient("http://unused"), BODY, meta={}) == "skipped"
    assert cancel(request_id, client=fake_redis, settings=settings) is True
    assert len(envelopes(fake_redis, keys, request_id)) == 2


def test_cancel_of_a_running_job_only_raises_the_flag(fake_redis: fakeredis.FakeRedis, settings: Settings) -> None:
    request_id = enqueue_chat_completion(BODY, client=fake_redis, settings=settings)
    fake_redis.set(settings.keys.cancel(request_id), jobs.RUNNING)
    assert cancel(request_id, client=fake_redis, settings=settings) is True
    assert fake_redis.get(settings.keys.cancel(request_id)) == jobs.CANCELLED
    assert fake_redis.exists(settings.keys.chunks(request_id)) == 0


def test_cancel_of_an_unknown_or_finished_request_does_nothing(fake_redis: fakeredis.FakeRedis,
                                                               settings: Settings) -> None:
    assert cancel("never-enqueued", client=fake_redis, settings=settings) is False
    request_id = enqueue_chat_completion(BODY, client=fake_redis, settings=settings)
    Job.fetch(job_id(settings.keys, request_id), connection=fake_redis).set_status(JobStatus.FINISHED)
    assert cancel(request_id, client=fake_redis, settings=settings) is False
    assert fake_redis.exists(settings.keys.chunks(request_id)) == 0


def test_a_job_whose_key_is_missing_fails_its_request_naming_the_variable_only(
        fake_redis: fakeredis.FakeRedis, settings: Settings, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("JOBS_TEST_KEY", raising=False)
    monkeypatch.setattr(jobs, "load_settings", lambda: settings)
    monkeypatch.setattr(jobs, "connect", lambda settings: fake_redis)
    with caplog.at_level(logging.ERROR):
        summary = jobs.run_chat_completion(RID, "default", BODY, {})
    assert summary == {"request_id": RID, "upstream": "default", "outcome": "failed", "calls": 0}
    error = decode_error(envelopes(fake_redis, settings.keys)[-1])
    assert error["type"] == "config_error" and "JOBS_TEST_KEY" in error["message"]
    assert "JOBS_TEST_KEY" in caplog.text
