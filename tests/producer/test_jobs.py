"""rq jobs: enqueueing a call, cancelling it before or while it runs, and the job function itself, on fakeredis.

What a call publishes for each way an upstream behaves is tested with the call (tests/producer/runner).
"""

from __future__ import annotations

import asyncio
import itertools
import logging

import fakeredis
import orjson
import pytest
from rq import Queue
from rq.job import Job, JobStatus

from producer import jobs
from producer.jobs import cancel, enqueue_chat_completion, job_id
from producer.runner import calls as runner_calls
from producer.runner.publishing import RUNNING
from producer.runner.calls import Calls
from streamfold.contract import Envelope, decode_envelope, decode_error
from streamfold.errors import ConfigError, ContractError
from streamfold.keys import Keys
from streamfold.settings import Settings

KEY = "sk-jobs-test-key-5f1e2d"
RID = "req-1"
BODY = {"model": "qwen_mt_flash_incremental", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def settings(namespace: str) -> Settings:
    return Settings(namespace=namespace, shards=2, queue=f"{namespace}-jobs",
                    upstreams={"default": {"base_url": "http://upstream.test/v1", "api_key_env": "JOBS_TEST_KEY"}})


def envelopes(client: fakeredis.FakeRedis, keys: Keys, request_id: str = RID) -> list[Envelope]:
    return [decode_envelope(fields) for _, fields in client.xrange(keys.chunks(request_id))]


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


def async_twin(client: fakeredis.FakeRedis) -> fakeredis.FakeAsyncRedis:
    """An asyncio client of the same fake server, as the runner's calls use."""
    return fakeredis.FakeAsyncRedis(server=client.connection_pool.connection_kwargs["server"])


def run_call(client: fakeredis.FakeRedis, settings: Settings, request_id: str) -> str:
    """A runner's call for ``request_id`` on the same fake Redis; returns its outcome."""
    async def go() -> str:
        async with Calls(settings, async_twin(client)) as calls:
            call, problem = calls.call(request_id, "default", BODY, {})
            return await calls.run(call, problem)
    return asyncio.run(go())


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
    assert run_call(fake_redis, settings, request_id) == "skipped"
    assert cancel(request_id, client=fake_redis, settings=settings) is True
    assert len(envelopes(fake_redis, keys, request_id)) == 2


def test_cancel_of_a_running_job_only_raises_the_flag(fake_redis: fakeredis.FakeRedis, settings: Settings) -> None:
    request_id = enqueue_chat_completion(BODY, client=fake_redis, settings=settings)
    fake_redis.set(settings.keys.cancel(request_id), RUNNING)
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
    monkeypatch.setattr(runner_calls, "connect_async", lambda settings: async_twin(fake_redis))
    with caplog.at_level(logging.ERROR):
        summary = jobs.run_chat_completion(RID, "default", BODY, {})
    assert summary == {"request_id": RID, "upstream": "default", "outcome": "failed", "calls": 0}
    error = decode_error(envelopes(fake_redis, settings.keys)[-1])
    assert error["type"] == "config_error" and "JOBS_TEST_KEY" in error["message"]
    assert any("JOBS_TEST_KEY" in str(getattr(record, "event_fields", "")) for record in caplog.records)


def test_the_job_function_runs_its_call_the_runners_way_on_an_event_loop_of_its_own(
        fake_redis: fakeredis.FakeRedis, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBS_TEST_KEY", KEY)
    monkeypatch.setattr(jobs, "load_settings", lambda: settings)
    monkeypatch.setattr(runner_calls, "connect_async", lambda settings: async_twin(fake_redis))
    fake_redis.set(settings.keys.cancel(RID), b"cancelled")
    assert jobs.run_chat_completion(RID, "default", BODY, {}) == {"request_id": RID, "upstream": "default",
                                                                    "outcome": "skipped", "calls": 0}


def test_a_job_that_dies_under_rq_fails_its_request_in_a_new_attempt_after_what_it_pushed(
        fake_redis: fakeredis.FakeRedis, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """rq's job timeout is raised into the call's event loop, which cancels the call before it publishes."""
    keys = settings.keys
    monkeypatch.setattr(jobs, "load_settings", lambda: settings)
    monkeypatch.setattr(jobs, "connect", lambda settings: fake_redis)

    async def timed_out(*args: object) -> None:
        from producer.publisher import Publisher
        publisher = Publisher(fake_redis, keys, batch_size=1)
        publisher.start(RID, token=job_id(keys, RID))
        publisher.push(RID, b'{"choices": []}')
        raise TimeoutError("JobTimeoutException")

    monkeypatch.setattr(runner_calls, "run_one", timed_out)
    with pytest.raises(TimeoutError):
        jobs.run_chat_completion(RID, "default", BODY, {})
    published = envelopes(fake_redis, keys)
    assert [(e.kind, e.attempt) for e in published] == [("start", 0), ("chunk", 0), ("error", 1)]
    assert decode_error(published[-1])["type"] == "producer_error"
