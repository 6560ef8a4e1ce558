"""Readers: a result by id, waiting for one without polling, following results, usage through consumer groups."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
import redis

from producer import wait_for_result
from producer.results import UsageReader, follow_results, get_result
from streamfold import contract
from streamfold.errors import ContractError, ResultTimeout
from streamfold.keys import Keys
from streamfold.settings import Settings


@pytest.fixture
def keys(namespace: str) -> Keys:
    return Keys(namespace=namespace, shards=3)


def record_for(request_id: str, status: str = "completed") -> dict[str, Any]:
    return {"request_id": request_id, "status": status, "completion": {"id": f"cmpl-{request_id}"}, "error": None,
            "warnings": [], "metrics": {"chunks": 3}, "meta": {}}


def publish_result(client: redis.Redis, keys: Keys, record: dict[str, Any]) -> None:
    """What a worker's finish makes visible: the lookup key, the results stream entry, the notification."""
    request_id = record["request_id"]
    encoded = contract.encode_record(record)
    client.set(keys.result(request_id), encoded, ex=60)
    client.xadd(keys.results(keys.shard(request_id)), {contract.RID: request_id.encode(), contract.DATA: encoded})
    client.publish(keys.notify(request_id), record["status"])


def publish_usage(client: redis.Redis, keys: Keys, request_id: str) -> None:
    event = {"request_id": request_id, "status": "completed", "total_tokens": 7}
    client.xadd(keys.usage(keys.shard(request_id)),
                {contract.RID: request_id.encode(), contract.DATA: contract.encode_record(event)})


def ids(records: list[dict[str, Any]]) -> list[str]:
    return [record["request_id"] for record in records]


# --- get_result / wait_for_result ------------------------------------------------------------------------

def test_get_result_is_none_until_the_record_is_stored(fake_redis: fakeredis.FakeRedis, keys: Keys) -> None:
    assert get_result(fake_redis, keys, "req-1") is None
    publish_result(fake_redis, keys, record_for("req-1"))
    assert get_result(fake_redis, keys, "req-1") == record_for("req-1")


def test_get_result_rejects_a_stored_value_that_is_not_a_record(fake_redis: fakeredis.FakeRedis,
                                                                keys: Keys) -> None:
    fake_redis.set(keys.result("req-1"), b"[1, 2]")
    with pytest.raises(ContractError):
        get_result(fake_redis, keys, "req-1")
    with pytest.raises(ContractError, match="request id"):
        get_result(fake_redis, keys, "has space")


@pytest.fixture
def settings(real_redis_url: str, namespace: str) -> Settings:
    return Settings(redis_url=real_redis_url, namespace=namespace, shards=3)


@pytest.fixture
def client(settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.redis_url)
    yield client
    client.close()


def publish_later(url: str, keys: Keys, record: dict[str, Any], delay: float) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        with redis.Redis.from_url(url) as worker_client:
            publish_result(worker_client, keys, record)
    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.redis
def test_wait_for_result_blocks_until_the_result_is_published_and_wakes_at_once(
        settings: Settings, client: redis.Redis) -> None:
    thread = publish_later(settings.redis_url, settings.keys, record_for("req-1"), delay=0.3)
    started = time.monotonic()
    record = wait_for_result("req-1", 10, client=client, settings=settings)
    waited = time.monotonic() - started
    thread.join()
    assert record == record_for("req-1")
    assert 0.25 <= waited < 2.0


@pytest.mark.redis
def test_wait_for_result_returns_a_stored_result_without_waiting(settings: Settings, client: redis.Redis) -> None:
    publish_result(client, settings.keys, record_for("req-1", "failed"))
    started = time.monotonic()
    assert wait_for_result("req-1", 10, client=client, settings=settings)["status"] == "failed"
    assert time.monotonic() - started < 1.0


@pytest.mark.redis
def test_wait_for_result_times_out_with_result_timeout(settings: Settings, client: redis.Redis) -> None:
    started = time.monotonic()
    with pytest.raises(ResultTimeout, match="req-1"):
        wait_for_result("req-1", 0.4, client=client, settings=settings)
    assert 0.35 <= time.monotonic() - started < 2.0


@pytest.mark.redis
def test_wait_for_result_ignores_other_requests_and_builds_its_own_client_from_settings(
        settings: Settings, client: redis.Redis) -> None:
    other = publish_later(settings.redis_url, settings.keys, record_for("req-other"), delay=0.1)
    mine = publish_later(settings.redis_url, settings.keys, record_for("req-mine"), delay=0.4)
    record = wait_for_result("req-mine", 10, settings=settings)
    other.join()
    mine.join()
    assert record["request_id"] == "req-mine"


# --- follow_results ---------------------------------------------------------------------------------------

def test_follow_results_from_start_reads_every_shard_then_ends(fake_redis: fakeredis.FakeRedis, keys: Keys) -> None:
    request_ids = [f"req-{n}" for n in range(12)]
    for request_id in request_ids:
        publish_result(fake_redis, keys, record_for(request_id))
    assert len({keys.shard(request_id) for request_id in request_ids}) == 3

    records = list(follow_results(fake_redis, keys, from_start=True, count=2))
    assert sorted(ids(records)) == sorted(request_ids)
    for shard in keys.shard_ids():
        in_shard = [rid for rid in request_ids if keys.shard(rid) == shard]
        assert [rid for rid in ids(records) if keys.shard(rid) == shard] == in_shard


def test_follow_results_without_from_start_sees_only_results_published_after_it_began(
        fake_redis: fakeredis.FakeRedis, keys: Keys) -> None:
    publish_result(fake_redis, keys, record_for("old"))
    assert list(follow_results(fake_redis, keys)) == []

    following = follow_results(fake_redis, keys, follow=True, block_ms=50)
    publish_result(fake_redis, keys, record_for("new-1"))
    publish_result(fake_redis, keys, record_for("new-2"))
    assert sorted([next(following)["request_id"], next(following)["request_id"]]) == ["new-1", "new-2"]


def test_follow_results_skips_entries_that_are_not_records(fake_redis: fakeredis.FakeRedis, keys: Keys,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    stream = keys.results(keys.shard("req-1"))
    fake_redis.xadd(stream, {contract.RID: b"bad", contract.DATA: b"{not json"})
    fake_redis.xadd(stream, {b"other": b"field"})
    publish_result(fake_redis, keys, record_for("req-1"))
    with caplog.at_level(logging.WARNING, logger="producer.results"):
        assert ids(list(follow_results(fake_redis, keys, from_start=True))) == ["req-1"]
    assert len(caplog.records) == 2


@pytest.mark.redis
def test_follow_results_blocks_for_new_results_on_real_redis(settings: Settings, client: redis.Redis) -> None:
    following = follow_results(client, settings.keys, follow=True, block_ms=100)
    thread = publish_later(settings.redis_url, settings.keys, record_for("late"), delay=0.3)
    assert next(following)["request_id"] == "late"
    thread.join()


# --- UsageReader ------------------------------------------------------------------------------------------

def drain(reader: UsageReader) -> list[str]:
    seen: list[str] = []
    reader.consume(lambda event: seen.append(event["request_id"]))
    return seen


def test_usage_reader_creates_its_group_on_every_shard_stream(fake_redis: fakeredis.FakeRedis, keys: Keys) -> None:
    reader = UsageReader(fake_redis, keys, group="billing")
    reader.create_groups()
    reader.create_groups()  # an existing group is kept
    for shard in keys.shard_ids():
        [group] = fake_redis.xinfo_groups(keys.usage(shard))
        assert group["name"] == b"billing"


def test_usage_reader_from_start_sees_earlier_events_and_a_new_group_only_later_ones(
        fake_redis: fakeredis.FakeRedis, keys: Keys) -> None:
    for n in range(5):
        publish_usage(fake_redis, keys, f"early-{n}")
    from_start = UsageReader(fake_redis, keys, group="history", from_start=True)
    new_only = UsageReader(fake_redis, keys, group="live")
    new_only.create_groups()
    publish_usage(fake_redis, keys, "late")

    assert sorted(drain(from_start)) == sorted([f"early-{n}" for n in range(5)] + ["late"])
    assert drain(new_only) == ["late"]


def test_consumed_events_are_acknowledged_and_not_delivered_again(fake_redis: fakeredis.FakeRedis,
                                                                  keys: Keys) -> None:
    for n in range(4):
        publish_usage(fake_redis, keys, f"req-{n}")
    reader = UsageReader(fake_redis, keys, from_start=True, count=1)
    assert len(drain(reader)) == 4
    for shard in keys.shard_ids():
        assert fake_redis.xpending(keys.usage(shard), "analytics")["pending"] == 0
    assert drain(UsageReader(fake_redis, keys, from_start=True)) == []


def test_a_restarted_reader_first_gets_back_what_it_had_not_acknowledged(fake_redis: fakeredis.FakeRedis,
                                                                        keys: Keys) -> None:
    for n in range(3):
        publish_usage(fake_redis, keys, f"req-{n}")
    crashed = UsageReader(fake_redis, keys, from_start=True, consumer="node-a")
    crashed.create_groups()
    delivered = [entry.event["request_id"] for entry in crashed.read()]
    assert len(delivered) >= 1  # read, then "crashed" before acknowledging

    publish_usage(fake_redis, keys, "after-restart")
    restarted = UsageReader(fake_redis, keys, from_start=True, consumer="node-a")
    first = [entry.event["request_id"] for entry in restarted.read()]
    assert sorted(first) == sorted(delivered)
    assert sorted(first + drain(restarted)) == sorted(["req-0", "req-1", "req-2", "after-restart"])


def test_events_handled_before_a_handler_failure_stay_acknowledged(fake_redis: fakeredis.FakeRedis,
                                                                   keys: Keys) -> None:
    for n in range(3):
        event = contract.encode_record({"request_id": f"r{n}"})
        fake_redis.xadd(keys.usage(0), {contract.RID: f"r{n}".encode(), contract.DATA: event})
    handled: list[str] = []

    def handle(event: dict[str, Any]) -> None:
        if event["request_id"] == "r1":
            raise RuntimeError("analytics store down")
        handled.append(event["request_id"])

    reader = UsageReader(fake_redis, keys, from_start=True)
    with pytest.raises(RuntimeError):
        reader.consume(handle)
    assert handled == ["r0"]
    assert drain(UsageReader(fake_redis, keys)) == ["r1", "r2"]


def test_the_same_reader_gets_unhandled_events_again_after_a_handler_failure(fake_redis: fakeredis.FakeRedis,
                                                                              keys: Keys) -> None:
    for n in range(3):
        publish_usage(fake_redis, keys, f"r{n}")
    failures = ["r1"]
    handled: list[str] = []

    def handle(event: dict[str, Any]) -> None:
        if event["request_id"] in failures:
            failures.remove(event["request_id"])
            raise RuntimeError("analytics store down for a moment")
        handled.append(event["request_id"])

    reader = UsageReader(fake_redis, keys, from_start=True)
    with pytest.raises(RuntimeError):
        reader.consume(handle)
    assert "r1" not in handled
    reader.consume(handle)  # the same process tries again
    assert sorted(handled) == ["r0", "r1", "r2"]
    assert all(fake_redis.xpending(keys.usage(shard), "analytics")["pending"] == 0 for shard in keys.shard_ids())


def test_unreadable_usage_entries_are_acknowledged_and_skipped(fake_redis: fakeredis.FakeRedis, keys: Keys) -> None:
    fake_redis.xadd(keys.usage(0), {contract.RID: b"bad", contract.DATA: b"\xff"})
    publish_usage(fake_redis, keys, "good")
    reader = UsageReader(fake_redis, keys, from_start=True)
    assert drain(reader) == ["good"]
    assert fake_redis.xpending(keys.usage(0), "analytics")["pending"] == 0


@pytest.mark.redis
def test_two_usage_groups_each_see_every_event(settings: Settings, client: redis.Redis) -> None:
    keys = settings.keys
    billing = UsageReader(client, keys, group="billing")
    dashboards = UsageReader(client, keys, group="dashboards")
    billing.create_groups()
    dashboards.create_groups()
    request_ids = [f"req-{n}" for n in range(20)]
    for request_id in request_ids:
        publish_usage(client, keys, request_id)

    assert sorted(drain(billing)) == sorted(request_ids)
    assert sorted(drain(dashboards)) == sorted(request_ids)
    assert drain(billing) == drain(dashboards) == []


@pytest.mark.redis
def test_a_following_usage_reader_blocks_until_an_event_arrives(settings: Settings, client: redis.Redis) -> None:
    reader = UsageReader(client, settings.keys)
    reader.create_groups()

    def publish() -> None:
        time.sleep(0.3)
        with redis.Redis.from_url(settings.redis_url) as producer_client:
            publish_usage(producer_client, settings.keys, "late")
    thread = threading.Thread(target=publish)
    thread.start()
    started = time.monotonic()
    batch: list[Any] = []
    while not batch and time.monotonic() - started < 5:
        batch = reader.read(block_ms=200)
    thread.join()
    assert [entry.event["request_id"] for entry in batch] == ["late"]
    reader.ack(batch)
