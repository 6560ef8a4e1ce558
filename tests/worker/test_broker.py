"""The Broker, the worker's one seam to Redis: each verb against fakeredis and, when one answers, a real Redis."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from pipeline_rig import Rig, client  # noqa: F401  (``client`` is a fixture)
from streamfold.connection import connect
from streamfold.contract import encode_record
from streamfold.errors import RedisUnavailable
from streamfold.settings import Settings
from worker.broker import Broker, Claim, Finish, Finished
from worker.housekeeping import Housekeeper
from worker.request import DeadLetter


@pytest.fixture
def rig(client: redis.Redis, namespace: str) -> Rig:  # noqa: F811
    return Rig(client, namespace)


def _finish(request_id: str, entry_id: str, status: str = "completed", dead: DeadLetter | None = None) -> Finish:
    record = {"request_id": request_id, "status": status}
    return Finish(request_id, (entry_id,), status, encode_record(record), encode_record({"request_id": request_id}),
                  dead)


def _ids(claims: list[Claim]) -> list[str]:
    return [claim.request_id for claim in claims]


def test_ensure_group_creates_the_control_stream_and_can_run_again(rig: Rig) -> None:
    broker = rig.broker()
    broker.ensure_group()
    broker.ensure_group()
    groups = rig.client.xinfo_groups(rig.keys.requests(0))
    assert [group["name"] for group in groups] == [b"workers"]


def test_each_request_is_claimed_by_one_consumer_and_never_more_than_asked(rig: Rig) -> None:
    for n in range(5):
        rig.publish(f"r{n}", [])
    first, second = rig.broker("a"), rig.broker("b")
    assert _ids(first.claim(3)) == ["r0", "r1", "r2"]
    assert _ids(second.claim(10)) == ["r3", "r4"]
    assert first.claim(10) == [] and second.claim(10) == []


def test_a_consumer_restarted_under_its_name_gets_its_own_pending_requests_back(rig: Rig) -> None:
    for n in range(3):
        rig.publish(f"r{n}", [])
    rig.broker("a").claim(2)
    restarted = rig.broker("a")
    assert _ids(restarted.claim(1)) == ["r0", "r1"]  # its own come back beyond the count; new ones stop
    assert _ids(restarted.claim(5)) == ["r2"]


def test_a_quiet_shard_is_asked_again_only_once_a_watching_read_saw_something_new(rig: Rig) -> None:
    rig.publish("r1", [], end=False)
    broker = rig.broker()
    assert _ids(broker.claim(10)) == ["r1"]  # fewer than asked: the shard is drained
    rig.publish("r2", [])
    assert broker.claim(10, skip_quiet=True) == []  # not asked: nothing new was seen
    broker.read({"r1": "0-0"}, watch=True)
    assert _ids(broker.claim(10, skip_quiet=True)) == ["r2"]
    rig.publish("r3", [])
    broker.read({"r1": "0-0"}, watch=False)  # unwatched: the broker no longer knows
    assert _ids(broker.claim(10, skip_quiet=True)) == ["r3"]


def test_a_control_entry_without_a_request_id_is_acknowledged_and_dropped(rig: Rig) -> None:
    broker = rig.broker()
    broker.ensure_group()
    rig.client.xadd(rig.keys.requests(0), {"junk": "1"})
    rig.publish("r1", [])
    (claim,) = broker.claim(10)
    assert claim.request_id == "r1"
    assert [entry["message_id"].decode() for entry in rig.pending()] == [claim.entry_id]


def test_read_returns_each_streams_entries_after_its_cursor(rig: Rig) -> None:
    rig.publish("r1", [b"{}", b"{}"])
    rig.publish("r2", [b"{}"], end=False)
    broker = rig.broker()
    batches = broker.read({"r1": "0-0", "r2": "0-0"})
    assert [fields[b"k"] for _, fields in batches["r1"]] == [b"start", b"chunk", b"chunk", b"end"]
    assert [fields[b"k"] for _, fields in batches["r2"]] == [b"start", b"chunk"]
    assert broker.read({"r1": batches["r1"][-1][0], "r2": batches["r2"][1][0]}) == {}


def test_finish_publishes_result_usage_and_notice_once(rig: Rig) -> None:
    rig.publish("r1", [b"{}"])
    broker = rig.broker()
    (claim,) = broker.claim(1)
    pubsub = rig.client.pubsub()
    pubsub.subscribe(rig.keys.notify("r1"))
    assert pubsub.get_message(timeout=1.0)["type"] == "subscribe"
    assert broker.finish([_finish("r1", claim.entry_id)]) == [Finished(True)]
    assert [record["request_id"] for record in rig.results()] == ["r1"]
    assert [event["request_id"] for event in rig.usage()] == ["r1"]
    assert rig.client.get(rig.keys.result("r1")) == encode_record({"request_id": "r1", "status": "completed"})
    assert 0 < rig.client.ttl(rig.keys.result("r1")) <= rig.settings.result_ttl
    assert rig.pending() == []
    message = pubsub.get_message(timeout=1.0)
    assert message is not None and message["data"] == b"completed"
    pubsub.close()


def test_a_second_finisher_is_a_no_op_that_still_acknowledges_its_entry(rig: Rig) -> None:
    rig.publish("r1", [b"{}"])
    first, second = rig.broker("a"), rig.broker("b")
    (claim,) = first.claim(1)
    rig.client.xclaim(rig.keys.requests(0), "workers", "b", 0, [claim.entry_id])  # b recovered it
    assert first.finish([_finish("r1", claim.entry_id)]) == [Finished(True)]
    assert second.finish([_finish("r1", claim.entry_id, status="incomplete")]) == [Finished(False)]
    assert [record["status"] for record in rig.results()] == ["completed"]
    assert len(rig.usage()) == 1
    assert rig.pending() == []


def test_finish_loads_its_script_again_when_redis_lost_it(rig: Rig) -> None:
    for n in range(3):
        rig.publish(f"r{n}", [])
    broker = rig.broker()
    claims = broker.claim(3)
    rig.client.script_flush()
    assert broker.finish([_finish(claim.request_id, claim.entry_id) for claim in claims]) == [Finished(True)] * 3
    rig.client.script_flush()
    assert broker.heartbeat({"r0": [claims[0].entry_id]}) == {}  # acknowledged: no longer owned
    assert len(rig.results()) == 3


def test_finish_keeps_the_chunks_readable_until_their_ttl(rig: Rig) -> None:
    rig.publish("r1", [b"{}"])
    broker = rig.broker()
    (claim,) = broker.claim(1)
    broker.finish([_finish("r1", claim.entry_id)])
    broker.finish([_finish("r1", claim.entry_id)])  # finished before: no second final entry
    entries = [fields for _, fields in rig.client.xrange(rig.keys.chunks("r1"))]
    assert [fields[b"k"] for fields in entries] == [b"start", b"chunk", b"end", b"final"]
    assert entries[-1][b"d"] == b"completed"
    assert 0 < rig.client.ttl(rig.keys.chunks("r1")) <= rig.settings.chunk_ttl


def test_a_finish_of_a_request_whose_chunk_key_is_not_a_stream_writes_no_final_entry(rig: Rig) -> None:
    rig.client.set(rig.keys.chunks("r1"), b"not a stream")
    rig.client.xadd(rig.keys.requests(0), {"rid": "r1", "ts": "1"})
    broker = rig.broker()
    (claim,) = broker.claim(1)
    assert broker.finish([_finish("r1", claim.entry_id, status="failed")]) == [Finished(True)]
    assert rig.client.get(rig.keys.chunks("r1")) == b"not a stream"


def test_finish_writes_the_dead_letter_with_its_reason(rig: Rig) -> None:
    rig.publish("r1", [b"oops"])
    broker = rig.broker()
    (claim,) = broker.claim(1)
    dead = DeadLetter("5-0", "seq 0: not JSON", b"oops")
    broker.finish([_finish("r1", claim.entry_id, "failed", dead)])
    broker.finish([_finish("r1", claim.entry_id, "failed", dead)])
    assert rig.dead_letters() == [{b"rid": b"r1", b"entry": b"5-0", b"reason": b"seq 0: not JSON", b"d": b"oops"}]


def test_a_heartbeat_cannot_take_back_a_request_another_worker_recovered(rig: Rig) -> None:
    rig.publish("r1", [])
    stalled, peer = rig.broker("stalled"), rig.broker("peer", claim_timeout=0.001)
    (claim,) = stalled.claim(1)
    time.sleep(0.01)
    assert _ids(peer.recover_stalled(10)) == ["r1"]
    assert stalled.heartbeat({"r1": [claim.entry_id]}) == {}
    assert stalled.hand_back({"r1": [claim.entry_id]}) == {}
    assert [entry["consumer"] for entry in rig.pending()] == [b"peer"]


def test_a_heartbeat_tells_apart_equal_entry_ids_of_two_shards(client: redis.Redis, namespace: str) -> None:  # noqa: F811
    rig = Rig(client, namespace, shards=2)
    ours, theirs = "r0", next(f"r{n}" for n in range(1, 100) if rig.keys.shard(f"r{n}") != rig.keys.shard("r0"))
    me = rig.broker("me")
    me.ensure_group()
    for request_id in (ours, theirs):  # the same entry id in both shards' control streams
        client.xadd(rig.keys.requests(rig.keys.shard(request_id)), {"rid": request_id}, id="5-0")
    assert sorted(_ids(me.claim(2))) == sorted([ours, theirs])
    client.xclaim(rig.keys.requests(rig.keys.shard(theirs)), "workers", "peer", 0, ["5-0"], justid=True)

    assert me.heartbeat({ours: ["5-0"], theirs: ["5-0"]}) == {ours: ["5-0"]}


def test_a_heartbeat_keeps_an_owned_claim_fresh(rig: Rig) -> None:
    rig.publish("r1", [])
    owner = rig.broker("owner")
    (claim,) = owner.claim(1)
    rig.client.xclaim(rig.keys.requests(0), "workers", "owner", 0, [claim.entry_id], idle=60_000, justid=True)
    assert owner.heartbeat({"r1": [claim.entry_id]}) == {"r1": [claim.entry_id]}
    assert rig.pending()[0]["time_since_delivered"] < 1_000
    assert rig.broker("peer").recover_stalled(10) == []


def test_a_handed_back_request_is_recovered_by_a_peer_at_once(rig: Rig) -> None:
    rig.publish("r1", [])
    leaving, peer = rig.broker("leaving"), rig.broker("peer")  # a claim timeout of 5 s for both
    (claim,) = leaving.claim(1)
    assert peer.recover_stalled(10) == []
    assert leaving.hand_back({"r1": [claim.entry_id]}) == {"r1": [claim.entry_id]}
    assert peer.recover_stalled(10) == [Claim(0, claim.entry_id, "r1")]


def test_recovery_walks_the_whole_pending_list_and_drops_deleted_entries(rig: Rig) -> None:
    for n in range(30):
        rig.publish(f"r{n:02d}", [])
    dead = rig.broker("dead")
    claims = dead.claim(30)
    rig.client.xclaim(rig.keys.requests(0), "workers", "dead", 0, [claim.entry_id for claim in claims],
                      idle=60_000, justid=True)
    rig.client.xdel(rig.keys.requests(0), *[claim.entry_id for claim in claims[:20]])
    peer = rig.broker("peer")
    assert _ids(peer.recover_stalled(5)) == [f"r{n}" for n in range(20, 25)]
    assert _ids(peer.recover_stalled(100)) == [f"r{n}" for n in range(25, 30)]
    assert {entry["consumer"] for entry in rig.pending()} == {b"peer"}
    assert len(rig.pending()) == 10


def test_trim_deletes_only_control_entries_no_group_needs(rig: Rig) -> None:
    for n in range(6):
        rig.publish(f"r{n}", [])
    broker = rig.broker()
    keeper = Housekeeper(rig.client, rig.settings, "w1")
    claims = broker.claim(4)
    for claim in claims[:2] + claims[3:]:
        broker.finish([_finish(claim.request_id, claim.entry_id)])
    rig.client.xgroup_create(rig.keys.requests(0), "audit", id=claims[1].entry_id)
    assert keeper.trim_control() == {rig.keys.requests(0): 2}  # r0, r1: acked, and delivered to audit
    remaining = [entry_id.decode() for entry_id, _ in rig.client.xrange(rig.keys.requests(0))]
    assert remaining[0] == claims[2].entry_id  # r2 is still pending; r4 and r5 were never delivered
    assert len(remaining) == 4
    rig.client.xgroup_destroy(rig.keys.requests(0), "audit")
    broker.finish([_finish(claims[2].request_id, claims[2].entry_id)])
    assert keeper.trim_control() == {rig.keys.requests(0): 2}
    assert _ids(broker.claim(10)) == ["r4", "r5"]


def test_control_entries_are_never_trimmed_before_a_worker_group_exists(rig: Rig) -> None:
    for n in range(3):
        rig.publish(f"r{n}", [])
    keeper = Housekeeper(rig.client, rig.settings, "w1")
    assert keeper.trim_control() == {rig.keys.requests(0): 0}
    assert rig.client.xlen(rig.keys.requests(0)) == 3


def test_leave_removes_the_consumer_only_when_it_owns_nothing(rig: Rig) -> None:
    rig.publish("r1", [])
    broker = rig.broker("a")
    (claim,) = broker.claim(1)
    broker.leave()
    assert [consumer["name"] for consumer in rig.client.xinfo_consumers(rig.keys.requests(0), "workers")] == [b"a"]
    broker.finish([_finish("r1", claim.entry_id)])
    broker.leave()
    assert rig.client.xinfo_consumers(rig.keys.requests(0), "workers") == []


def test_a_lost_group_is_created_again_on_the_next_claim(rig: Rig) -> None:
    broker = rig.broker()
    broker.ensure_group()
    rig.client.delete(rig.keys.requests(0))
    with pytest.raises(RedisUnavailable, match="consumer group missing"):
        broker.heartbeat({"r1": ["1-0"]})
    rig.publish("r1", [])
    assert _ids(broker.claim(1)) == ["r1"]


def test_redis_errors_leave_the_broker_as_redis_unavailable(namespace: str) -> None:
    client = connect(Settings(redis_url="redis://127.0.0.1:1/0"))  # nothing listens on port 1
    broker = Rig(client, namespace).broker()
    for verb in (broker.ensure_group, lambda: broker.claim(1), lambda: broker.read({"r1": "0-0"}),
                 lambda: broker.finish([_finish("r1", "1-0")]), lambda: broker.heartbeat({"r1": ["1-0"]})):
        with pytest.raises(RedisUnavailable):
            verb()
    client.close()


def test_a_redis_that_cannot_serve_for_now_is_unavailable(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    broker = rig.broker()
    broker.ensure_group()

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'.")

    monkeypatch.setattr(broker._redis, "xreadgroup", out_of_memory)
    with pytest.raises(RedisUnavailable, match="unavailable.*OOM"):
        broker.claim(1)


@pytest.mark.redis
def test_a_watching_read_wakes_for_a_new_request(real_redis: redis.Redis, real_redis_url: str, namespace: str) -> None:
    rig = Rig(real_redis, namespace)
    rig.publish("r1", [], end=False)
    broker = rig.broker()
    broker.claim(1)
    started = time.monotonic()
    assert broker.read({"r1": "9999999999999-0"}, watch=True, block_ms=200) == {}
    assert time.monotonic() - started >= 0.15  # nothing new: the read blocked
    other = redis.Redis.from_url(real_redis_url)
    timer = threading.Timer(0.2, lambda: Rig(other, namespace).publish("r2", []))
    timer.start()
    started = time.monotonic()
    assert broker.read({"r1": "9999999999999-0"}, watch=True, block_ms=5_000) == {}
    assert time.monotonic() - started < 2.0  # the new control entry ended the wait
    timer.join()
    other.close()
    assert _ids(broker.claim(1)) == ["r2"]


@pytest.mark.redis
def test_a_blocking_read_that_outlives_the_socket_timeout_is_redis_unavailable(namespace: str,
                                                                              real_redis_url: str) -> None:
    # Redis did not answer in time: the worker must count that as time without Redis, not as a silence.
    client = redis.Redis.from_url(real_redis_url, socket_timeout=0.2)
    broker: Broker = Rig(client, namespace).broker()
    broker.ensure_group()
    with pytest.raises(RedisUnavailable):
        broker.claim(1, block_ms=1_000)
    with pytest.raises(RedisUnavailable):
        broker.read({"r1": "0-0"}, block_ms=1_000)
    assert broker.claim(1) == []  # the entries a lost claim reply held would be re-read from here
    client.close()
