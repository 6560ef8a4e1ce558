"""Least privilege on a real Redis: each role, as an ACL user made from ``python -m worker acl``'s rules, runs
its own code and is refused outside its keys."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
import redis

from producer import Publisher, cancel, enqueue_chat_completion, wait_for_result
from producer.follow import follow
from producer.mock_upstream import MockUpstream
from producer.results import UsageReader, follow_results, get_result, stored_usage
from streamfold.acl import ROLES, setuser
from streamfold.errors import RedisRefused
from streamfold.settings import Settings
from tests.conftest import RECORDED, ROOT, TEST_REDIS_URL, load_jsonl
from tests.producer.gateway.conftest import serve_app
from worker import assemble, health, stats
from worker.broker import Broker
from worker.live import Final
from worker.runner import Worker

pytestmark = pytest.mark.redis

CHUNKS = load_jsonl(RECORDED / "openai_refusal.jsonl")
User = Callable[[str], redis.Redis]


@pytest.fixture
def settings(namespace: str) -> Settings:
    return Settings(redis_url=TEST_REDIS_URL, namespace=namespace, queue=namespace, block_ms=50, socket_timeout=2,
                    stall_timeout=5, claim_timeout=5)


@pytest.fixture
def as_role(real_redis: redis.Redis, settings: Settings) -> Iterator[User]:
    """A client logged in as a fresh ACL user holding exactly one role's rules."""
    made: list[tuple[str, redis.Redis]] = []

    def make(role: str) -> redis.Redis:
        name, password = f"{settings.namespace}-{role}", uuid.uuid4().hex
        real_redis.execute_command("ACL", "SETUSER", *setuser(role, settings.keys, user=name, password=password))
        client = redis.Redis.from_url(TEST_REDIS_URL, username=name, password=password)
        made.append((name, client))
        return client

    yield make
    for name, client in made:
        client.close()
        real_redis.execute_command("ACL", "DELUSER", name)
    for key in real_redis.scan_iter(match=f"rq:*{settings.namespace}*"):
        real_redis.delete(key)


def _finished(admin: redis.Redis, settings: Settings, request_id: str) -> None:
    """A request published and assembled with full rights, for the readers to read."""
    Publisher(admin, settings.keys, batch_size=1).start(request_id)
    publisher = Publisher(admin, settings.keys, batch_size=100)
    for chunk in CHUNKS:
        publisher.push(request_id, chunk)
    publisher.end(request_id)
    Worker(Broker.from_settings(admin, settings, "admin"), settings, burst=True).run()


def _refused(action: Callable[[], Any]) -> None:
    with pytest.raises((redis.exceptions.NoPermissionError, RedisRefused)):
        action()


def test_the_command_prints_a_line_redis_cli_runs(settings: Settings, real_redis: redis.Redis) -> None:
    env = {"STREAMFOLD_NAMESPACE": settings.namespace, "WORKER_PASSWORD": "s3cret", "PATH": ""}
    line = subprocess.run([sys.executable, "-m", "worker", "acl", "--role", "worker", "--password-env",
                           "WORKER_PASSWORD"], env=env, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "s3cret" not in line
    words = shlex.split(line)
    assert words[:3] == ["ACL", "SETUSER", f"{settings.namespace}-worker"]
    try:
        assert real_redis.execute_command(*words) in (b"OK", True)
    finally:
        real_redis.execute_command("ACL", "DELUSER", words[2])


def test_a_producer_publishes_and_reads_neither_results_nor_usage(as_role: User, settings: Settings,
                                                                 real_redis: redis.Redis) -> None:
    producer = as_role("producer")
    publisher = Publisher(producer, settings.keys, batch_size=1)
    publisher.start("r1")
    for chunk in CHUNKS:
        publisher.push("r1", chunk)
    publisher.end("r1")
    assert real_redis.xlen(settings.keys.chunks("r1")) == len(CHUNKS) + 2
    _refused(lambda: get_result(producer, settings.keys, "r1"))
    _refused(lambda: producer.xrange(settings.keys.usage(0)))
    _refused(lambda: producer.xreadgroup("workers", "w", {settings.keys.requests(0): ">"}))


def test_a_worker_assembles_reports_and_keeps_house_and_touches_nothing_else(as_role: User, settings: Settings,
                                                                            real_redis: redis.Redis) -> None:
    publisher = Publisher(real_redis, settings.keys, batch_size=100)
    publisher.start("r1")
    for chunk in CHUNKS:
        publisher.push("r1", chunk)
    publisher.end("r1")
    publisher.flush()
    worker_client = as_role("worker")
    serving = Worker(Broker.from_settings(worker_client, settings, "w1"), settings, burst=True)
    assert serving.run() == 0
    assert get_result(real_redis, settings.keys, "r1")["status"] == "completed"  # type: ignore[index]
    assert stats.collect(worker_client, settings, interval=0)["workers"] is not None
    assert health.check(worker_client, settings)[0]
    real_redis.delete(settings.keys.housekeeping())  # the lease the burst run took: housekeep again now
    done = serving.housekeeper.run(lease_s=1)
    assert done is not None and done.problems == []
    _refused(lambda: worker_client.lpush(f"rq:queue:{settings.namespace}", b"x"))
    _refused(lambda: worker_client.set("elsewhere", b"x"))


def test_a_backend_enqueues_cancels_waits_and_follows_but_never_reads_usage(as_role: User, settings: Settings,
                                                                           real_redis: redis.Redis) -> None:
    _finished(real_redis, settings, "done")
    backend = as_role("backend")
    assert wait_for_result("done", 5, client=backend, settings=settings)["status"] == "completed"
    assert isinstance(list(follow("done", client=backend, settings=settings))[-1], Final)
    assert [record["request_id"] for record in follow_results(backend, settings.keys, from_start=True)] == ["done"]
    request_id = enqueue_chat_completion({"model": "m", "messages": []}, client=backend, settings=settings)
    assert cancel(request_id, client=backend, settings=settings)  # not started: the backend fails it itself
    _refused(lambda: backend.xrange(settings.keys.usage(0)))
    _refused(lambda: backend.set(settings.keys.result("done"), b"forged"))


def test_analytics_reads_usage_events_and_nothing_else(as_role: User, settings: Settings,
                                                       real_redis: redis.Redis) -> None:
    _finished(real_redis, settings, "done")
    analytics = as_role("analytics")
    seen: list[dict[str, Any]] = []
    UsageReader(analytics, settings.keys, group="billing", consumer="b1", from_start=True).consume(seen.append)
    assert [event["request_id"] for event in seen] == ["done"]
    assert [event["request_id"] for event in stored_usage(analytics, settings.keys)] == ["done"]
    _refused(lambda: analytics.xrange(settings.keys.chunks("done")))
    _refused(lambda: get_result(analytics, settings.keys, "done"))


def test_every_role_has_rules() -> None:
    assert ROLES == ("producer", "worker", "backend", "analytics")


def test_a_whole_stack_runs_with_each_process_as_its_own_role(as_role: User, settings: Settings,
                                                              real_redis: redis.Redis) -> None:
    """The gateway as ``backend``, a call runner as ``producer``, a stream worker as ``worker``, a usage
    reader as ``analytics``: a streamed call and a waited one go through, each process with only its rules."""
    roles = {role: as_role(role).connection_pool.connection_kwargs for role in ("producer", "worker", "backend")}
    analytics = as_role("analytics")
    with MockUpstream() as upstream:
        table = {"default": {"base_url": upstream.base_url}}
        env = {name: value for name, value in os.environ.items() if not name.startswith("STREAMFOLD_")}
        env.update(STREAMFOLD_REDIS_URL=TEST_REDIS_URL, STREAMFOLD_NAMESPACE=settings.namespace,
                   STREAMFOLD_QUEUE=settings.namespace, STREAMFOLD_UPSTREAMS=json.dumps(table),
                   STREAMFOLD_BLOCK_MS="100", STREAMFOLD_UPSTREAM_RETRIES="0")
        processes = [subprocess.Popen([sys.executable, "-m", *command], cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True,
                                      env={**env, "STREAMFOLD_REDIS_USERNAME": roles[role]["username"],
                                           "STREAMFOLD_REDIS_PASSWORD": roles[role]["password"]})
                     for role, command in (("producer", ["producer", "work"]), ("worker", ["worker", "run"]))]
        gateway = serve_app(Settings(redis_url=TEST_REDIS_URL, namespace=settings.namespace, queue=settings.queue,
                                     upstreams=table, redis_username=roles["backend"]["username"],
                                     redis_password=roles["backend"]["password"]))
        try:
            client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            with client.chat.completions.stream(model="openai_refusal", messages=[{"role": "user", "content": "Hi"}]
                                                ) as stream:
                streamed = stream.get_final_completion()
            waited = client.chat.completions.create(model="openai_parallel_tool_calls",
                                                    messages=[{"role": "user", "content": "Hi"}])
        finally:
            gateway.stop()
            for process in processes:
                process.terminate()
            outputs = [process.communicate(timeout=30)[0] for process in processes]
    assert streamed.choices[0].message.refusal == assemble(CHUNKS)["completion"]["choices"][0]["message"]["refusal"]
    assert len(waited.choices[0].message.tool_calls or []) == 2
    for output, role in zip(outputs, ("producer", "worker")):
        assert "NOPERM" not in output and "NoPermission" not in output, output
        assert roles[role]["password"] not in output
    # Nothing refused along the way, not even something a process retried or worked around.
    refused = [entry for entry in real_redis.acl_log(count=1000)
               if str(entry.get("username", "")).startswith(settings.namespace)]
    assert refused == []
    seen: list[dict[str, Any]] = []
    UsageReader(analytics, settings.keys, group="billing", consumer="b1", from_start=True).consume(seen.append)
    assert len(seen) == 2 and {event["status"] for event in seen} == {"completed"}
